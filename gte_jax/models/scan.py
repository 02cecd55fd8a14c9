"""Scanned layers: a tower's layer stack stored stacked and run as one ``jax.lax.scan``.

With ``scan_layers`` on (every family's config; the ``model.scan_layers`` switch), a tower's
``layers`` attribute is ONE layer module whose every parameter has a leading ``[layers]`` axis
(MaxText's layout), instead of an ``nnx.List`` of L modules. The forward pass is a scan over that
axis, so XLA compiles one layer body whatever the depth: the program, its compile time and the
compiler's host memory stop growing with L (a 32-layer 7B train step compiles like a 1-layer one).

Outside the towers the layout is nearly invisible: a parameter path with a layer index,
``("encoder", "layers", 3, "query", "kernel")`` (the HF name maps of every family), addresses row
3 of the stacked leaf ``encoder/layers/query/kernel`` (:func:`get_leaf`, :func:`set_leaf`); the
sharding rules give the stacked axis the logical name ``layers`` (never split); LoRA factors of a
stacked projection are stacked too.

A stacked path is told from an unstacked one by what follows ``layers``: a layer index (an int, or
its string in a restored checkpoint) in an unrolled tower, an attribute name in a scanned one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The attribute every tower keeps its layer stack under, and the logical name of the stacked axis.
LAYERS = "layers"
_STACKED_PATH = re.compile(rf"(^|/){LAYERS}/(?!\d+(/|$))")


def layer_stack(make_layer: Callable[[], nnx.Module], n: int, scanned: bool) -> nnx.Module:
    """A tower's ``layers``: ``n`` layers stacked (``scanned``) or an ``nnx.List`` of them."""
    return stack(make_layer, n) if scanned else nnx.List([make_layer() for _ in range(n)])


def stack(make_layer: Callable[[], nnx.Module], n: int) -> nnx.Module:
    """``n`` layers from ``make_layer()`` (called n times in order, so the random init equals an
    unrolled tower's) as one module whose every leaf is stacked on a new leading axis. A random
    init holds the layers twice while it stacks; a loaded model is built abstractly
    (``nnx.eval_shape`` in ``gte_jax.hf``), so nothing is held there."""
    layers = [make_layer() for _ in range(n)]
    graphdef = nnx.split(layers[0])[0]
    states = [nnx.split(layer)[1] for layer in layers]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return nnx.merge(graphdef, stacked)


def run(
    layers: nnx.Module,
    forward: Callable[..., jax.Array],
    x: jax.Array,
    per_layer: Any = None,
    *,
    remat: bool,
) -> jax.Array:
    """``x`` through every layer of the stacked ``layers``: ``x = forward(layer_i, x, slice_i)``
    for i = 0..L-1, with ``slice_i`` row i of every leaf of ``per_layer`` (dropout keys, a layer
    type index; None: nothing per layer). ``remat``: each layer is rematerialised in the backward
    pass (the policy of the unrolled towers' ``nnx.remat``: nothing saved inside a layer)."""
    graphdef, state = nnx.split(layers)

    def body(carry: jax.Array, xs: tuple) -> tuple[jax.Array, None]:
        layer_state, extra = xs
        return forward(nnx.merge(graphdef, layer_state), carry, extra), None

    if remat:
        # prevent_cse=False: inside a scan the loop already keeps XLA from undoing the remat.
        body = jax.checkpoint(body, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (state, per_layer))
    return x


def is_stacked_path(path: str) -> bool:
    """True for a leaf of a stacked layer module ("params/encoder/layers/query/kernel"), False for
    an unrolled layer's ("params/encoder/layers/3/query/kernel") or any other leaf."""
    return bool(_STACKED_PATH.search(path))


def _split_index(path: Sequence[Any], node: Any) -> tuple[list[Any], int | None]:
    """(the path without the layer index, the index) when ``path`` addresses a row of a stacked
    leaf of ``node``; else (path, None)."""
    keys = list(path)
    for i, key in enumerate(keys[:-1]):
        if isinstance(key, int) and i and keys[i - 1] == LAYERS:
            parent = node
            for k in keys[:i]:
                parent = parent[k]
            if key not in parent and str(key) not in parent:
                return keys[:i] + keys[i + 1 :], key
    return keys, None


def get_leaf(tree: Any, path: Sequence[Any]) -> Any:
    """The leaf at ``path`` of a nested dict, a row of a stacked leaf when ``path`` names a layer
    index that a scanned tower stores stacked."""
    keys, index = _split_index(path, tree)
    node = tree
    for key in keys:
        node = node[key]
    return node if index is None else node[index]


def set_leaf(tree: dict, path: Sequence[Any], array: np.ndarray) -> tuple[int, ...]:
    """Writes ``array`` at ``path`` (as :func:`get_leaf` reads it) and returns the shape that was
    there (a row's for a stacked leaf). A stacked leaf still abstract (``nnx.eval_shape``) becomes
    a NumPy array of its shape first. The caller checks the shape."""
    keys, index = _split_index(path, tree)
    *parents, leaf = keys
    node = tree
    for key in parents:
        node = node[key]
    if index is None:
        expected = tuple(node[leaf].shape)
        if tuple(array.shape) == expected:
            node[leaf] = np.ascontiguousarray(array)
        return expected
    full = node[leaf]
    if not isinstance(full, np.ndarray):
        full = node[leaf] = np.zeros(full.shape, np.dtype(full.dtype))
    expected = tuple(full.shape[1:])
    if tuple(array.shape) == expected:
        full[index] = array
    return expected


def unstacked(path: tuple[Any, ...], n: int) -> Iterator[tuple[int | None, tuple[Any, ...]]]:
    """(row, the unrolled tower's path) for a module path: each layer's for a module inside a
    stacked layer stack ("encoder", "layers", "query") -> (i, ("encoder", "layers", i, "query")),
    else (None, path) once."""
    text = "/".join(map(str, path)) + "/"
    if not is_stacked_path(text):
        yield None, path
        return
    at = next(i for i, key in enumerate(path) if key == LAYERS) + 1
    for i in range(n):
        yield i, path[:at] + (i,) + path[at:]


def stack_saved(saved: Any) -> Any:
    """A restored unrolled layer stack ({"0": {...}, "1": {...}}) stacked as a scanned tower stores
    it ({...: [L, ...]}); anything else unchanged."""
    if isinstance(saved, dict) and saved and all(str(k).isdigit() for k in saved):
        rows = [saved[k] for k in sorted(saved, key=lambda k: int(k))]
        return jax.tree.map(
            lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs), *rows
        )
    return saved


def unstack_saved(saved: Any, n: int) -> dict:
    """A stacked layer stack ({...: [L, ...]}) as an unrolled tower stores it ({"0": {...}})."""
    return {str(i): jax.tree.map(lambda x, i=i: x[i], saved) for i in range(n)}


def _unrolled(tree: Any) -> bool:
    return isinstance(tree, Mapping) and bool(tree) and all(str(k).isdigit() for k in tree)


def like(base: Mapping, saved: Any) -> Any:
    """``saved[LAYERS]`` (a restored checkpoint's layer stack) in ``base[LAYERS]``'s layout:
    stacked for a scanned tower, per layer for an unrolled one (a checkpoint written with the
    other ``scan_layers`` setting is converted, not refused)."""
    if _unrolled(saved) and not _unrolled(base):
        return stack_saved(saved)
    if _unrolled(base) and isinstance(saved, Mapping) and not _unrolled(saved):
        return unstack_saved(saved, len(base))
    return saved


def layout(tree: Any) -> str | None:
    """The layout of a pytree's layer stack: "stacked" (a scanned tower's), "unrolled" (an
    unrolled tower's), or None when it holds none."""
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        text = jax.tree_util.keystr(path, simple=True, separator="/")
        if is_stacked_path(text):
            return "stacked"
        if re.search(rf"(^|/){LAYERS}/\d+/", text):
            return "unrolled"
    return None
