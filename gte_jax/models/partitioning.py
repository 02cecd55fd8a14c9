"""Activation sharding: logical axes of activations -> mesh axes, and the constraint the towers
apply (MaxText's ``logical_axis_rules`` for activations).

Why constraints inside the towers: with FSDP the weights are split over ``"data"`` too, and a
layer's matmul ``x @ W`` has two operands split on the same mesh axis. Without a hint XLA may
keep the weight split and gather the activation (the whole chunk) along the batch instead of
gathering the weight; pinning every layer's input and output to ``batch -> "data"`` leaves only
the weight to gather. The mesh comes from the context (:func:`mesh_context` in the train step:
``jax.sharding.use_abstract_mesh``, which works under ``jit``); with none, :func:`constrain` is
the identity, so encode, export and tests without a mesh run the towers unchanged.

This module holds the mesh axis names and imports nothing of the package: the model families
import it, and :mod:`gte_jax.sharding` (which reads the families' parameter axes) re-exports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import AxisType, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Logical activation axis -> mesh axis (ours, names after MaxText). The batch is split over
# "data" in every mode; heads and the MLP width over "model" (tensor parallelism: mesh.model > 1
# only with sharding.params=fsdp_tp, a size-1 axis is dropped); length and embed stay whole.
ACTIVATION_AXIS_RULES: dict[str, str | None] = {
    "batch": DATA_AXIS,
    "length": None,
    "embed": None,
    "heads": MODEL_AXIS,
    "kv": None,  # head_dim
    "mlp": MODEL_AXIS,
}


def activation_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.AbstractMesh
) -> PartitionSpec | None:
    """The ``PartitionSpec`` of an activation with logical axes ``names`` on ``mesh`` (None: no
    constraint to apply). A mesh axis is used when it exists, has size > 1, is not manual
    (inside ``shard_map`` the batch is already local), divides the dim and is not taken by an
    earlier dim."""
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} for an activation of shape {tuple(shape)}")
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    spec: list[str | None] = []
    for name, dim in zip(names, shape, strict=True):
        axis = ACTIVATION_AXIS_RULES.get(name) if name else None
        usable = axis in types and types[axis] != AxisType.Manual and mesh.shape[axis] > 1
        spec.append(axis if usable and dim % mesh.shape[axis] == 0 and axis not in spec else None)
    return PartitionSpec(*spec) if any(spec) else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` pinned to the mesh layout of its logical axes ``names`` (e.g. ``("batch", "length",
    "embed")``) when a mesh is in context; else ``x`` unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = activation_spec(names, x.shape, mesh)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def whole(x: jax.Array) -> jax.Array:
    """``x`` whole on every device when a mesh is in context (else unchanged): a small table
    (T5's relative position bias) that FSDP split, gathered before it is indexed."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec())


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]`` ([vocab, embed] -> [*ids.shape, embed]) with the table whole on every
    device when a mesh is in context. Why: FSDP splits a table on its embed dim, and left alone
    XLA looks up the ids in each device's slice, so it gathers the ids along the batch and then
    swaps the [batch, length, embed] output back to a batch split (an all-to-all of the
    activations); gathering the table, as FSDP does for every other weight, moves no
    activation."""
    out = jax.numpy.take(whole(table), ids, axis=0)
    return constrain(out, ("batch",) + (None,) * (out.ndim - 1))


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh | None) -> Iterator[None]:
    """Makes ``mesh`` the context of :func:`constrain` (also inside ``jit``, where
    ``jax.set_mesh`` is refused); a no-op for ``None``."""
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield
