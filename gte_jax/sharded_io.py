"""Weights at 7B: load a Hugging Face directory straight onto its shards, one host array at a time
out again.

A 7B model is ~28 GB in float32; a TPU host holds four or eight chips and each chip a slice of it.
:func:`load_model_sharded` builds every parameter with ``jax.make_array_from_callback`` for the
train step's own shardings (:func:`param_shardings`: ``gte_jax.sharding.state_shardings``, the one
rule), and the callback reads only the slice a device holds, ``safe_open(...).get_slice(name)[idx]``
(the torch layout transposed back, a scanned tower's rows read one torch tensor each), cast
straight to the leaf's dtype (bfloat16 for a frozen LoRA base when asked). No host ever builds a
whole tensor it does not hold, let alone the whole float32 model. ``gs://`` weights are copied to a
local cache directory first (safetensors memory-maps local files only): the copy is on disk, not
in memory.

The other direction is ``gte_jax.sharding.host_value``, one array at a time: the export writes
tensor by tensor (``gte_jax.hf.HostTensor``), never the whole model on one device or host.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import safe_open

from gte_jax import hf
from gte_jax import sharding as shd
from gte_jax.models import scan

logger = logging.getLogger(__name__)


class TensorFiles:
    """The tensors of a model directory's safetensors files, read by slice (memory-mapped: a read
    touches only the bytes of its slice). ``gs://`` files are copied to ``cache_dir`` first."""

    def __init__(self, directory: epath.PathLike, cache_dir: str | None = None):
        directory = epath.Path(directory)
        index = directory / hf.SAFETENSORS_INDEX
        if (directory / hf.SAFETENSORS_FILE).exists():
            files = [hf.SAFETENSORS_FILE]
        elif index.exists():
            files = sorted(set(hf._read_json(index).get("weight_map", {}).values()))
        else:
            hf.load_safetensors(directory)  # raises the loader's own error (pickles, no weights)
            files = []
        self._tmp = None
        if not hf.is_local(directory):
            if cache_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="gte_jax_weights_")
                cache_dir = self._tmp.name
            local = []
            for name in files:
                target = os.path.join(cache_dir, name)
                with (directory / name).open("rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 64 * 2**20)  # streamed: 64 MiB at a time
                local.append(target)
            paths = local
        else:
            paths = [os.fspath(directory / name) for name in files]
        self._handles = [safe_open(p, framework="numpy") for p in paths]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``name[index]`` (one slice per dim) as a NumPy array: only those bytes are read."""
        return self._where[name].get_slice(name)[index]

    def read_all(self, name: str) -> np.ndarray:
        return self.read(name, tuple(slice(None) for _ in self.shape(name)))


def param_shardings(abstract_params: Any, mesh: Any, sharding_cfg: Any) -> Any:
    """The shardings the train state gives these parameters (``sharding.state_shardings`` on a
    state holding them under ``"params"``): what the loader places each leaf with."""
    return shd.state_shardings({"params": abstract_params}, mesh, sharding_cfg)["params"]


def load_model_sharded(
    path: epath.PathLike,
    shardings_of: Callable[[Any], Any],
    *,
    dtype: Any = jnp.float32,
    param_dtype: Callable[[str], Any] | None = None,
    files: type[TensorFiles] = TensorFiles,
    **config_overrides: Any,
) -> tuple[Any, hf.PretrainedInfo]:
    """``gte_jax.hf.load_model`` (same model, same info, bitwise the same float32 values) with
    every parameter a global ``jax.Array`` built shard by shard.

    ``shardings_of(abstract pure param dict) -> the same tree of shardings`` (e.g.
    ``lambda a: param_shardings(a, mesh, config.sharding)``). ``param_dtype``: a function of the
    leaf's path ("encoder/layers/0/self_attn/q_proj/kernel") giving its dtype (None: float32 for
    every leaf, as load_model); values are read in the file's dtype and cast once per slice. ``dtype``: the compute dtype, as for load_model.
    """
    reader: TensorFiles | None = None

    def names(transformer_dir: epath.Path) -> list[str]:
        nonlocal reader
        reader = files(transformer_dir)
        return reader.names()

    plan = hf.plan_load(path, names, dtype=dtype, **config_overrides)
    assert reader is not None
    pure = nnx.to_pure_dict(plan.state)
    sources = _leaf_sources(plan, pure)
    shardings = shardings_of(pure)
    dtype_of = param_dtype or (lambda _path: np.float32)
    projection = plan.st.get("projection_tensors", {})

    def build(key_path, abstract, sharding):
        path = shd.path_str(key_path)
        target = np.dtype(dtype_of(path))
        if path in sources:
            rows, transpose = sources[path]
            read = _slice_reader(reader, rows, transpose, target)
        elif path.startswith("projection/") and path.split("/")[-1] in projection:
            host = projection[path.split("/")[-1]]  # the Dense module: [in, out], small
            read = lambda index, host=host: host[index].astype(target)  # noqa: E731
        else:
            raise ValueError(f"{plan.transformer_dir}: no tensor for the parameter {path}")
        return jax.make_array_from_callback(tuple(abstract.shape), sharding, read)

    pure = jax.tree_util.tree_map_with_path(build, pure, shardings)
    # Carried, not trained (the BERT pooler): small, read whole.
    extra = {k: reader.read_all(plan.file_names[k]).astype(np.float32) for k in plan.extra_names}
    return plan.finish(pure, extra)


def _leaf_sources(plan: hf.LoadPlan, pure: dict) -> dict[str, tuple[list[str] | str, bool]]:
    """{leaf path: (the file name of its tensor, or of each row of a stacked leaf, transpose?)}."""
    stacked: dict[str, dict[int, str]] = {}
    sources: dict[str, tuple[Any, bool]] = {}
    for name, (where, transpose) in plan.names.items():
        keys, row = scan._split_index(tuple(where), pure)
        leaf = "/".join(map(str, keys))
        if row is None:
            sources[leaf] = (plan.file_names[name], transpose)
        else:
            stacked.setdefault(leaf, {})[row] = plan.file_names[name]
            sources[leaf] = (None, transpose)
    for leaf, rows in stacked.items():
        sources[leaf] = ([rows[i] for i in range(len(rows))], sources[leaf][1])
    return sources


def _slice_reader(
    reader: TensorFiles, rows: list[str] | str, transpose: bool, target: np.dtype
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """The callback of one leaf: its ``index`` read from the file(s), in the leaf's layout."""

    def one(name: str, index: Sequence[slice]) -> np.ndarray:
        index = tuple(index)
        if transpose:  # torch Linear weights are (out, in); ours (in, out)
            return reader.read(name, index[::-1]).T.astype(target)
        return reader.read(name, index).astype(target)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if isinstance(rows, str):
            return one(rows, index)
        # A scanned tower's leaf [layers, ...]: its rows are the layers' own tensors.
        return np.stack([one(rows[i], index[1:]) for i in range(len(rows))[index[0]]])

    return read
