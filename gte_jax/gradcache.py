"""GradCache (Gao et al., 2021): the exact gradient of a huge-batch contrastive loss in chunks.

The contrastive loss couples all examples, but it depends on the parameters only through the
embeddings. So:

1. pass 1 embeds the global batch chunk by chunk with no gradient (no activations kept);
2. the loss and its gradient w.r.t. the [B, D] embeddings are computed on the whole batch;
3. pass 2 re-runs each chunk under ``jax.vjp`` and pulls the cached embedding gradient back to
   the parameters, accumulating over chunks in a ``lax.scan``.

Peak activation memory is that of one chunk; the price is one extra forward. Pass 2 must see the
same dropout masks as pass 1: chunk k of role r (``query``/``doc``/``neg``) always gets the key
``fold_in(fold_in(rng, ROLE_INDEX[r]), k)``, also in :func:`embed_batch`, the plain
(non-cached) path, so both paths give the same numbers for the same ``num_chunks``.

Chunk layout: example b goes to chunk ``b % num_chunks``, row ``b // num_chunks``. Why strided:
the batch is split over ``"data"`` in contiguous blocks, so reshaping [B] -> [B/C, C] keeps the
split on the major axis at no cost, and after the swap to [C, B/C] every chunk is spread over all
devices. Contiguous chunks would put each chunk on a few devices and leave the rest idle.

Interfaces:
  * ``embed_fn(params, inputs, rng) -> [b, D]`` float32, where ``inputs`` is a dict with one role's
    model inputs with the role prefix stripped (``input_ids``, ``attention_mask``, optional
    ``pool_mask`` / ``token_type_ids``; all [b, L]) and ``rng`` a key or ``None`` (no dropout).
    Packed batches add ``segment_ids`` / ``position_ids`` [R, L] and ``slot_index`` [b] (or
    [b, K]); ``embed_fn`` then returns ``slot_index.shape + (D,)``. Packed in GradCache chunks
    (``<role>_chunk_index`` present; docs/design.md, "Packing with GradCache"), a role's rows are
    [D*R, C, L] and its ``slot_index`` [D*S, C]: axis 1 is the chunk, so [C, D*R, L] is a local
    transpose; the role brings its own C (its token budget decided it), and chunk c's outputs
    [D*S, D] go back to example order by the gather ``chunk_index`` [B] (or [B, K]) into the
    [C, D*S] outputs; pass 2 gets each chunk's cached gradient from that gather's transpose.
    For an NNX ``BiEncoder`` it is ``nnx.merge(graphdef, params)(...)`` (``train.make_embed_fn``).
  * ``loss_fn(embeddings, batch) -> (loss, metrics)`` with ``embeddings = {"query": [B, D],
    "doc": [B, D], "neg": [B, K, D] (if the batch has negatives)}``; :func:`make_loss_fn` builds
    it from :mod:`gte_jax.losses` and the batch's text ids / ``valid`` / ``neg_valid``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from gte_jax import losses
from gte_jax.sharding import DATA_AXIS

Array = jax.Array
Params = Any
Batch = Mapping[str, Array]
EmbedFn = Callable[[Params, dict[str, Array], Array | None], Array]
LossFn = Callable[[dict[str, Array], Batch], tuple[Array, dict[str, Array]]]

ROLES = ("query", "doc", "neg")
ROLE_INDEX = {role: i for i, role in enumerate(ROLES)}
_NOT_MODEL_INPUTS = ("text_id", "valid")  # neg_valid: the loss's, not the model's


def role_inputs(batch: Batch, role: str) -> dict[str, Array]:
    """The model inputs of one role, role prefix stripped: ``doc_input_ids`` -> ``input_ids``."""
    prefix = role + "_"
    return {
        key[len(prefix) :]: value
        for key, value in batch.items()
        if key.startswith(prefix) and key[len(prefix) :] not in _NOT_MODEL_INPUTS
    }


def batch_roles(batch: Batch) -> tuple[str, ...]:
    """The roles present in the batch: query and doc always, neg when hard negatives are given."""
    for role in ("query", "doc"):
        if f"{role}_input_ids" not in batch:
            raise KeyError(f"batch has no '{role}_input_ids'; keys: {sorted(batch)}")
    return ROLES if "neg_input_ids" in batch else ROLES[:2]


def _constrain(x: Array, mesh: jax.sharding.Mesh | None, spec: PartitionSpec) -> Array:
    if mesh is not None:
        return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    if not jax.sharding.get_abstract_mesh().empty:  # a mesh set with jax.set_mesh
        return lax.with_sharding_constraint(x, spec)
    return x


def replicate(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """``tree`` gathered whole on every device (a sharding constraint; ``mesh`` or the one in
    context; unchanged without either)."""
    return jax.tree.map(lambda x: _constrain(x, mesh, PartitionSpec()), tree)


def split_chunks(
    x: Array, num_chunks: int, mesh: jax.sharding.Mesh | None = None, data_axis: str = DATA_AXIS
) -> Array:
    """[B, ...] -> [num_chunks, B/num_chunks, ...]; example b -> (b % num_chunks, b // num_chunks).

    The second (within-chunk) axis carries the ``data_axis`` split of the batch, without moving
    any data (see the module docstring).
    """
    b = x.shape[0]
    if b % num_chunks:
        raise ValueError(f"batch size {b} is not divisible by num_chunks={num_chunks}")
    x = x.reshape(b // num_chunks, num_chunks, *x.shape[1:])  # [B/C, C, ...], split stays on B/C
    x = jnp.swapaxes(x, 0, 1)  # [C, B/C, ...]
    return _constrain(x, mesh, PartitionSpec(None, data_axis))


def merge_chunks(
    x: Array, mesh: jax.sharding.Mesh | None = None, data_axis: str = DATA_AXIS
) -> Array:
    """Inverse of :func:`split_chunks`: [C, B/C, ...] -> [B, ...]."""
    x = jnp.swapaxes(x, 0, 1)  # [B/C, C, ...]
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # [B, ...]
    return _constrain(x, mesh, PartitionSpec(data_axis))


def chunk_keys(rng: Array | None, role: str, num_chunks: int) -> Array | None:
    """[num_chunks] dropout keys of one role; chunk k gets fold_in(fold_in(rng, role), k)."""
    if rng is None:
        return None
    role_key = jax.random.fold_in(rng, ROLE_INDEX[role])
    return jax.vmap(lambda k: jax.random.fold_in(role_key, k))(jnp.arange(num_chunks))


def is_packed(batch: Batch) -> bool:
    """Whether the batch holds packed rows (``<role>_segment_ids`` + ``<role>_slot_index``)."""
    return "query_slot_index" in batch


def _embed_chunk(
    embed_fn: EmbedFn, params: Params, inputs: dict[str, Array], rng: Array | None, role: str
) -> Array:
    """Embeds one chunk of one role; hard negatives [c, K, L] are flattened to [c*K, L] and back.

    Packed inputs ([R, L] rows + ``slot_index`` [B] or [B, K]) come out in ``slot_index``'s
    shape already."""
    if role != "neg" or "slot_index" in inputs:
        return embed_fn(params, inputs, rng)  # [c, D]
    c, k = inputs["input_ids"].shape[:2]
    flat = {name: v.reshape(c * k, *v.shape[2:]) for name, v in inputs.items()}  # [c*K, L]
    emb = embed_fn(params, flat, rng)  # [c*K, D]
    return emb.reshape(c, k, emb.shape[-1])  # [c, K, D]


def is_chunk_packed(batch: Batch, role: str = "query") -> bool:
    """Whether ``role`` is packed in GradCache chunks (``<role>_chunk_index``; docs/design.md,
    "Packing with GradCache"): rows [D*R, C, L], ``slot_index`` [D*S, C]."""
    return f"{role}_chunk_index" in batch


def _to_chunks(x: Array, mesh, data_axis) -> Array:
    """[D*R, C, ...] -> [C, D*R, ...]: a local transpose, the data split stays on the rows."""
    return _constrain(jnp.swapaxes(x, 0, 1), mesh, PartitionSpec(None, data_axis))


def _chunked_inputs(batch, num_chunks, mesh, data_axis):
    """Per role: (inputs split into chunks [C, ...], C). Chunk-packed roles bring their own C."""
    roles = batch_roles(batch)
    out = {}
    for role in roles:
        inputs = role_inputs(batch, role)
        if is_chunk_packed(batch, role):
            del inputs["chunk_index"]
            chunks = {k: _to_chunks(v, mesh, data_axis) for k, v in inputs.items()}
            out[role] = (chunks, inputs["slot_index"].shape[1])
            continue
        if is_packed(batch) and num_chunks != 1:
            raise ValueError(
                f"packed rows in one chunk with GradCache chunks (num_chunks={num_chunks}): build"
                " the batch with pack_chunks=num_chunks (the chunked packed layout)"
            )
        b = batch["query_input_ids"].shape[0]
        if mesh is not None and (b % num_chunks or (b // num_chunks) % mesh.shape[data_axis]):
            raise ValueError(
                f"batch size {b} must split into num_chunks={num_chunks} chunks whose size is a "
                f"multiple of the {data_axis!r} axis ({mesh.shape[data_axis]} devices)"
            )
        split = lambda x: split_chunks(x, num_chunks, mesh, data_axis)  # noqa: E731
        out[role] = (jax.tree.map(split, inputs), num_chunks)
    return roles, out


def _flat(x: Array, role: str, packed: bool) -> Array:
    """A role's chunks as rows: unpacked hard negatives [C, c, K, ...] -> [C, c*K, ...] (the
    flattening :func:`_embed_chunk` does per chunk); any other role unchanged."""
    if role != "neg" or packed:
        return x
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _loops(batch: Batch, roles: tuple[str, ...], chunks, keys) -> list[tuple[str, ...]]:
    """The roles as chunk loops: consecutive unpacked roles whose chunks have the same count and
    the same row shapes (queries, documents and one hard negative at one length) run as one loop
    over their chunks in role order, so XLA compiles the tower once instead of once per role
    (a 7B plan's compile time is its number of kernels). The sum over chunks keeps its order
    (role by role, chunk by chunk) and each chunk its inputs and dropout key, so the numbers are
    the per-role loops' (tests/test_gradcache.py). Packed roles keep a loop each."""

    def signature(role):
        if is_packed(batch):
            return None
        flat = jax.tree.map(lambda x: _flat(x, role, False), chunks[role][0])
        shapes = jax.tree.map(lambda x: (x.shape, x.dtype), flat)
        return (jax.tree.structure(flat), tuple(jax.tree.leaves(shapes)), keys[role] is None)

    loops: list[tuple[str, ...]] = []
    for role in roles:
        if loops and signature(role) is not None and signature(role) == signature(loops[-1][0]):
            loops[-1] += (role,)
        else:
            loops.append((role,))
    return loops


def _joined(loop: tuple[str, ...], per_role: Mapping[str, Any], packed: bool | None) -> Any:
    """One loop's per-role chunk trees ([C, ...] each) as one [sum C, ...] tree (role order);
    rows flattened (:func:`_flat`) unless ``packed`` is None (the dropout keys, [C])."""
    flat = [
        per_role[r]
        if packed is None
        else jax.tree.map(lambda x, r=r: _flat(x, r, packed), per_role[r])
        for r in loop
    ]
    return flat[0] if len(loop) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *flat)


def _embed_rows(embed_fn, params, inputs, key, loop: tuple[str, ...], packed: bool) -> Array:
    """One chunk of a loop: packed rows through :func:`_embed_chunk` (one role per loop), else
    the rows (hard negatives already flat) through ``embed_fn``."""
    if packed:
        return _embed_chunk(embed_fn, params, inputs, key, loop[0])
    return embed_fn(params, inputs, key)  # [rows, D]


def _parts(out: Array, loop: tuple[str, ...], counts: Mapping[str, int], neg_k: int) -> dict:
    """The loop's outputs [sum C, rows, D] back per role ([C, c, (K,) D]); ``neg_k``: K of
    unpacked hard negatives (0: packed, outputs already in ``slot_index``'s shape)."""
    parts, start = {}, 0
    for role in loop:
        part = out[start : start + counts[role]]
        start += counts[role]
        if role == "neg" and neg_k:
            part = part.reshape(part.shape[0], part.shape[1] // neg_k, neg_k, part.shape[-1])
        parts[role] = part
    return parts


def _merge(emb: Array, batch: Batch, role: str, mesh, data_axis) -> Array:
    """Chunk outputs [C, n, (K,) D] -> the role's embeddings in example order [B, (K,) D]."""
    if not is_chunk_packed(batch, role):
        return merge_chunks(emb, mesh, data_axis)
    index = batch[f"{role}_chunk_index"]  # [B] or [B, K] into the [C * n] outputs
    return emb[index // emb.shape[1], index % emb.shape[1]]


def _unmerge(grad: Array, shape, batch: Batch, role: str, mesh, data_axis) -> Array:
    """Transpose of :func:`_merge`: the embedding gradient [B, (K,) D] -> per chunk [C, n, D]
    (unused chunk entries get zero)."""
    if not is_chunk_packed(batch, role):
        return split_chunks(grad, shape[0], mesh, data_axis)
    _, pullback = jax.vjp(lambda e: _merge(e, batch, role, mesh, data_axis), jnp.zeros(shape))
    return _constrain(pullback(grad)[0], mesh, PartitionSpec(None, data_axis))


def embed_batch(
    embed_fn: EmbedFn,
    params: Params,
    batch: Batch,
    rng: Array | None,
    num_chunks: int = 1,
    *,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = DATA_AXIS,
) -> dict[str, Array]:
    """Differentiable embedding of every role, chunk by chunk with the GradCache dropout keys.

    This is the plain path: ``jax.value_and_grad`` through it keeps the activations of all chunks.
    """
    roles, chunks = _chunked_inputs(batch, num_chunks, mesh, data_axis)
    out = {}
    for role in roles:
        inputs, n = chunks[role]
        keys = chunk_keys(rng, role, n)

        def one(xs, role=role):
            inputs, key = xs
            return _embed_chunk(embed_fn, params, inputs, key, role)

        out[role] = _merge(lax.map(one, (inputs, keys)), batch, role, mesh, data_axis)
    return out


def plain_value_and_grad(
    embed_fn: EmbedFn,
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    rng: Array | None,
    num_chunks: int = 1,
    **kwargs: Any,
) -> tuple[tuple[Array, dict[str, Array]], Params]:
    """``jax.value_and_grad`` of ``loss_fn(embed_batch(...))``: same numbers as GradCache, more memory."""

    def total(p):
        return loss_fn(embed_batch(embed_fn, p, batch, rng, num_chunks, **kwargs), batch)

    return jax.value_and_grad(total, has_aux=True)(params)


def cached_value_and_grad(
    embed_fn: EmbedFn,
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    rng: Array | None,
    num_chunks: int,
    *,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = DATA_AXIS,
    gather: str | None = None,
    param_shardings: Any = None,
) -> tuple[tuple[Array, dict[str, Array]], Params]:
    """GradCache: ``((loss, metrics), grads)`` equal to :func:`plain_value_and_grad`.

    ``batch`` is the global batch (design.md format). ``mesh`` (or a mesh set with
    ``jax.set_mesh``) pins the chunks to ``P(None, data_axis)``; without one, XLA's propagation
    usually finds the same layout. Per-layer rematerialisation inside a chunk is the model's job
    (``EncoderConfig.remat``): remat of the whole ``embed_fn`` here would recompute the forward
    right before its own backward and save nothing.

    ``gather`` (``per_chunk`` | ``per_step``; ``sharding.gather_params``) runs pass 2 per device
    with one gradient reduction per parameter per step (:func:`_backward_reduce_once`);
    ``param_shardings`` (the params' ``NamedSharding`` tree) says which leaves FSDP splits, so
    their gradients come out reduce-scattered to the same split. ``None`` or ``per_layer``: the
    global-view scan, which XLA partitions with one reduction per chunk and, with FSDP, each
    layer's weights gathered as it runs (no full-size weights or gradient on any device).
    """
    roles, chunks = _chunked_inputs(batch, num_chunks, mesh, data_axis)
    keys = {role: chunk_keys(rng, role, chunks[role][1]) for role in roles}
    frozen = lax.stop_gradient(params)
    if gather == "per_step" and _reducible_once(batch, _mesh_of(mesh), data_axis):
        # Gathered whole once, before the chunk loop (else XLA gathers each weight per chunk).
        frozen = replicate(frozen, mesh)

    # Pass 1: embeddings without gradient; lax.map keeps one chunk's activations alive at a time.
    packed, loops = is_packed(batch), _loops(batch, roles, chunks, keys)
    inputs = {role: chunks[role][0] for role in roles}
    embeddings, shapes = _pass_one(
        embed_fn, frozen, batch, loops, inputs, keys, chunks, mesh, data_axis
    )

    (loss, metrics), emb_grads = jax.value_and_grad(lambda e: loss_fn(e, batch), has_aux=True)(
        embeddings
    )

    cached = {
        role: _unmerge(emb_grads[role], shapes[role], batch, role, mesh, data_axis)
        for role in roles
    }  # [C, B/C, (K,) D] per role
    mesh = _mesh_of(mesh)
    if gather in REDUCE_ONCE_MODES and _reducible_once(batch, mesh, data_axis):
        joined = [
            (loop, _joined(loop, inputs, packed), _joined(loop, keys, None),
             _joined(loop, cached, packed))
            for loop in loops
        ]  # fmt: skip
        grads = _backward_reduce_once(
            embed_fn, params, joined, packed, mesh, data_axis, param_shardings, gather
        )
        return (loss, metrics), grads

    # Pass 2: per chunk, vjp of the encoder with the cached embedding gradient; sum over chunks.
    grads = jax.tree.map(jnp.zeros_like, params)
    for loop in loops:

        def backward_one(acc, xs, loop=loop):
            chunk, key, emb_grad = xs
            embed = lambda p: _embed_rows(embed_fn, p, chunk, key, loop, packed)  # noqa: E731
            _, pullback = jax.vjp(embed, params)
            (chunk_grads,) = pullback(emb_grad)
            return jax.tree.map(jnp.add, acc, chunk_grads), None

        xs = tuple(
            _joined(loop, x, flat) for x, flat in ((inputs, packed), (keys, None), (cached, packed))
        )
        grads, _ = lax.scan(backward_one, grads, xs)
    return (loss, metrics), grads


def _pass_one(embed_fn, frozen, batch, loops, inputs, keys, chunks, mesh, data_axis):
    """GradCache's pass 1, loop by loop (:func:`_loops`): ({role: [B, (K,) D]}, {role: its
    chunk outputs' shape [C, B/C, (K,) D]})."""
    packed, neg_k = is_packed(batch), _neg_k(batch)
    counts = {role: n for role, (_, n) in chunks.items()}
    embeddings, shapes = {}, {}
    for loop in loops:

        def embed_one(xs, loop=loop):
            return _embed_rows(embed_fn, frozen, *xs, loop, packed)

        out = lax.map(embed_one, (_joined(loop, inputs, packed), _joined(loop, keys, None)))
        for role, emb in _parts(out, loop, counts, neg_k).items():  # [C, B/C, (K,) D]
            shapes[role] = emb.shape
            embeddings[role] = _merge(emb, batch, role, mesh, data_axis)  # [B, (K,) D]
    return embeddings, shapes


def _neg_k(batch: Batch) -> int:
    """K of unpacked hard negatives ([B, K, L] ids), else 0."""
    ids = batch.get("neg_input_ids")
    return int(ids.shape[1]) if ids is not None and not is_packed(batch) else 0


# per_layer: the global-view scan (XLA gathers each layer's weights as the layer runs and
# reduce-scatters the gradients in every chunk: FSDP's memory); per_chunk / per_step: the
# per-device backward, one reduction per step, a full-size gradient accumulator per device.
GATHER_MODES = ("per_layer", "per_chunk", "per_step")
REDUCE_ONCE_MODES = ("per_chunk", "per_step")


def _mesh_of(mesh: Any) -> Any:
    """The mesh passed, else the one in context (an empty abstract mesh when none)."""
    return mesh if mesh is not None else jax.sharding.get_abstract_mesh()


def _reducible_once(batch: Batch, mesh: Any, data_axis: str) -> bool:
    """Whether pass 2 can run per device (:func:`_backward_reduce_once`): a mesh whose data
    axis has > 1 device, and every packed role chunk-packed (its texts sit in its device's rows;
    one-chunk packing spreads a device's texts over any rows)."""
    if mesh is None or mesh.empty or mesh.shape.get(data_axis, 1) == 1:
        return False
    return not is_packed(batch) or all(is_chunk_packed(batch, r) for r in batch_roles(batch))


def _data_spec(sharding: Any, ndim: int, data_axis: str) -> PartitionSpec:
    """The part of a parameter's sharding on ``data_axis`` (shard_map names only its manual
    axis; a tensor-parallel split over "model" stays XLA's)."""
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return PartitionSpec(*(data_axis if a == data_axis else None for a in spec))


def _gather(x: Array, spec: PartitionSpec, data_axis: str) -> Array:
    for dim, axis in enumerate(spec):
        if axis == data_axis:
            return lax.all_gather(x, data_axis, axis=dim, tiled=True)
    return x


def _reduce(x: Array, spec: PartitionSpec, data_axis: str) -> Array:
    """The sum over devices of a per-device gradient, split as the parameter: a reduce-scatter
    for an FSDP-split leaf, an all-reduce for a replicated one."""
    for dim, axis in enumerate(spec):
        if axis == data_axis:
            return lax.psum_scatter(x, data_axis, scatter_dimension=dim, tiled=True)
    return lax.psum(x, data_axis)


def _local_slots(inputs: dict[str, Array], data_axis: str) -> dict[str, Array]:
    """Packed chunk inputs inside ``shard_map``: ``slot_index`` holds global slots
    ``(device * R + r) * L + s``; the device's own rows are [R, L], so its texts' slots less
    ``device * R * L``. Unused entries point at device 0's first text: clipped, their cached
    gradient is zero."""
    if "slot_index" not in inputs:
        return inputs
    rows, length = inputs["input_ids"].shape[:2]
    local = inputs["slot_index"] - lax.axis_index(data_axis) * rows * length
    return {**inputs, "slot_index": jnp.clip(local, 0, rows * length - 1)}


def _backward_reduce_once(
    embed_fn, params, loops, packed, mesh, data_axis, param_shardings, gather
) -> Params:
    """Pass 2 per device (``shard_map`` over ``data_axis``): each device pulls its rows of every
    chunk back to the full parameters and sums over chunks and roles into its own accumulator;
    one reduction per parameter after the scans (not one per chunk, role and parameter, as the
    global-view scan partitions). The price: each device holds a full-size gradient accumulator.
    ``gather``: FSDP-split parameters are all-gathered in every chunk (``per_chunk``; with
    scanned layers the whole stack at once, so the full weights are resident as with
    ``per_step``) or once before the scans (``per_step``: fewer collectives). Dropout
    masks match pass 1: :mod:`gte_jax.models.dropout` offsets the batch index by the device's
    block. ``loops``: (roles, chunk inputs, dropout keys, cached gradients) of each chunk loop
    (:func:`_loops`, :func:`_joined`)."""
    if gather not in REDUCE_ONCE_MODES:
        raise ValueError(f"gather={gather!r}: use one of {REDUCE_ONCE_MODES}")
    if param_shardings is None:
        specs = jax.tree.map(lambda x: PartitionSpec(), params)
    else:
        specs = jax.tree.map(lambda s, x: _data_spec(s, x.ndim, data_axis), param_shardings, params)
    per_chunk = gather == "per_chunk"
    replicated = jax.tree.map(lambda _: PartitionSpec(), params)
    rows = PartitionSpec(None, data_axis)

    def body(p, chunks, keys, cached):
        full = lambda q: jax.tree.map(lambda x, s: _gather(x, s, data_axis), q, specs)  # noqa: E731
        resident = full(p) if per_chunk else p  # per_chunk: only its shape is used here
        acc = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), resident)
        for i, (loop, *_) in enumerate(loops):

            def backward_one(acc, xs, loop=loop):
                inputs, key, emb_grad = xs
                weights = full(p) if per_chunk else p
                inputs = _local_slots(inputs, data_axis)
                embed = lambda w: _embed_rows(embed_fn, w, inputs, key, loop, packed)  # noqa: E731
                _, pullback = jax.vjp(embed, weights)
                (chunk_grads,) = pullback(emb_grad)
                return jax.tree.map(jnp.add, acc, chunk_grads), None

            acc, _ = lax.scan(backward_one, acc, (chunks[i], keys[i], cached[i]))
        return jax.tree.map(lambda g, s: _reduce(g, s, data_axis), acc, specs)

    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(specs if per_chunk else replicated, rows, PartitionSpec(), rows),
        out_specs=specs,
        axis_names={data_axis},
        check_vma=False,  # the per-device sums are reduced by hand (_reduce)
    )
    inputs, keys, cached = ([x[i] for x in loops] for i in (1, 2, 3))
    return run(params, inputs, keys, cached)


def make_loss_fn(name: str = "gte", **loss_kwargs: Any) -> LossFn:
    """A ``loss_fn(embeddings, batch)`` for :mod:`gte_jax.losses`, reading the batch's text ids
    (``query_text_id``, ``doc_text_id``, ``neg_text_id``), ``valid`` and ``neg_valid`` (placeholder
    negatives of records with fewer than K) when present."""

    def loss_fn(embeddings: dict[str, Array], batch: Batch):
        return losses.contrastive_loss(
            name,
            embeddings["query"],
            embeddings["doc"],
            neg=embeddings.get("neg"),
            q_ids=batch.get("query_text_id"),
            d_ids=batch.get("doc_text_id"),
            neg_ids=batch.get("neg_text_id"),
            valid=batch.get("valid"),
            neg_valid=batch.get("neg_valid") if "neg" in embeddings else None,
            **loss_kwargs,
        )

    return loss_fn
