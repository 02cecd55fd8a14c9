"""GradCache equals plain autodiff of the whole batch, with dropout, on 1 device and on 8."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from numerics import reorder_atol

from gte_jax import gradcache, sharding

VOCAB, WIDTH, HIDDEN, OUT = 40, 12, 24, 8
DROPOUT = 0.2


def key(seed: int) -> jax.Array:
    # Why rbg: the threefry hash of every dropout mask costs ~1 s of XLA CPU compile each; rbg is
    # one RngBitGenerator op. Key handling (fold_in per role and chunk) is the same for any impl.
    return jax.random.key(seed, impl="rbg")


def init_params(seed: int = 0) -> dict[str, jax.Array]:
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "embed": jax.random.normal(k[0], (VOCAB, WIDTH)),
        "w1": jax.random.normal(k[1], (WIDTH, HIDDEN)) / np.sqrt(WIDTH),
        "b1": jnp.zeros((HIDDEN,)),
        "w2": jax.random.normal(k[2], (HIDDEN, OUT)) / np.sqrt(HIDDEN),
    }


def encode(params, inputs, rng):
    """Tiny encoder: embedding + MLP with dropout + masked mean pool + L2 norm. [b, L] -> [b, OUT]."""
    x = params["embed"][inputs["input_ids"]]  # [b, L, W]
    h = jnp.tanh(x @ params["w1"] + params["b1"])  # [b, L, H]
    if rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - DROPOUT, h.shape)
        h = jnp.where(keep, h / (1.0 - DROPOUT), 0.0)
    y = h @ params["w2"]  # [b, L, OUT]
    mask = inputs["attention_mask"].astype(jnp.float32)
    if "pool_mask" in inputs:
        mask = mask * inputs["pool_mask"]
    pooled = jnp.einsum("blo,bl->bo", y, mask) / jnp.sum(mask, axis=1, keepdims=True)  # [b, OUT]
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def make_batch(n: int = 16, k: int = 2, lq: int = 5, ld: int = 7, seed: int = 0, negatives=True):
    rs = np.random.RandomState(seed)

    def tokens(*shape):
        ids = rs.randint(1, VOCAB, size=shape).astype(np.int32)
        lengths = rs.randint(1, shape[-1] + 1, size=shape[:-1])
        mask = (np.arange(shape[-1]) < lengths[..., None]).astype(np.int32)
        return ids * mask, mask

    batch = {}
    batch["query_input_ids"], batch["query_attention_mask"] = tokens(n, lq)
    batch["query_pool_mask"] = np.ones((n, lq), np.int32)
    batch["query_pool_mask"][:, 0] = 0  # an instruction token, not pooled
    batch["query_pool_mask"][:, 1] = 1
    batch["query_attention_mask"][:, :2] = 1
    batch["doc_input_ids"], batch["doc_attention_mask"] = tokens(n, ld)
    # Some duplicate texts, so the masks are exercised (ids are text ids, not tied to the tokens).
    batch["query_text_id"] = np.arange(n, dtype=np.int32)
    batch["query_text_id"][3] = batch["query_text_id"][1]
    batch["doc_text_id"] = n + np.arange(n, dtype=np.int32)
    batch["doc_text_id"][5] = batch["doc_text_id"][2]
    batch["valid"] = np.ones((n,), np.int32)
    batch["valid"][-1] = 0
    if negatives:
        batch["neg_input_ids"], batch["neg_attention_mask"] = tokens(n, k, ld)
        batch["neg_text_id"] = (2 * n + np.arange(n * k, dtype=np.int32)).reshape(n, k)
        batch["neg_text_id"][0, -1] = batch["doc_text_id"][4]
    return batch


def reference_value_and_grad(params, batch, rng, num_chunks, loss_fn):
    """Plain jax.value_and_grad of the whole batch, chunk layout and keys written out by hand."""
    n = batch["query_input_ids"].shape[0]
    roles = ["query", "doc"] + (["neg"] if "neg_input_ids" in batch else [])

    def total(p):
        emb = {}
        for r_index, role in enumerate(roles):
            inputs = {
                key[len(role) + 1 :]: jnp.asarray(v)
                for key, v in batch.items()
                if key.startswith(role + "_") and not key.endswith("text_id")
            }
            parts, order = [], []
            for c in range(num_chunks):
                rows = np.arange(c, n, num_chunks)  # strided chunk c
                key = jax.random.fold_in(jax.random.fold_in(rng, r_index), c)
                chunk = {name: v[rows] for name, v in inputs.items()}
                if role == "neg":
                    kk = chunk["input_ids"].shape[1]
                    flat = {name: v.reshape(-1, v.shape[-1]) for name, v in chunk.items()}
                    parts.append(encode(p, flat, key).reshape(len(rows), kk, OUT))
                else:
                    parts.append(encode(p, chunk, key))
                order.append(rows)
            emb[role] = jnp.concatenate(parts)[np.argsort(np.concatenate(order))]
        return loss_fn(emb, batch)

    return jax.jit(jax.value_and_grad(total, has_aux=True))(params)


# The sums whose order chunking and sharding change: every gradient entry is a sum over all the
# batch's tokens (make_batch's defaults: 16 x 5 query, 16 x 7 doc and 16 x 2 x 7 negative tokens),
# reached through dot products over WIDTH, HIDDEN and OUT; the loss sums over the same rows.
REORDERED_TERMS = 16 * 5 + 16 * 7 + 16 * 2 * 7 + WIDTH + HIDDEN + OUT


def assert_close(a, b, n_terms=REORDERED_TERMS):
    """Equal up to float32 summation order (tests/numerics.py): |a - b| <= gamma_n x each leaf's
    magnitude. A wrong dropout key or a lost chunk moves entries by O(1) of that magnitude."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(1.0, float(np.abs(np.asarray(y)).max()))
        atol = reorder_atol(scale, n_terms)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


NUM_CHUNKS = 2
# One jit object per path, so a test that repeats a shape reuses the executable.
CACHED = jax.jit(gradcache.cached_value_and_grad, static_argnums=(0, 1, 5))
PLAIN = jax.jit(gradcache.plain_value_and_grad, static_argnums=(0, 1, 5))


@functools.cache
def problem(loss_name: str, negatives: bool):
    """Params, a 32-example batch, a key, the loss_fn and the hand-written reference result."""
    params, batch, rng = init_params(), make_batch(n=32, negatives=negatives), key(7)
    loss_fn = gradcache.make_loss_fn(loss_name)
    ref = reference_value_and_grad(params, batch, rng, NUM_CHUNKS, loss_fn)
    return params, batch, rng, loss_fn, ref


@pytest.mark.parametrize("loss_name,negatives", [("gte", False), ("gte", True), ("infonce", True)])
def test_gradcache_equals_plain_with_dropout(loss_name, negatives):
    params, batch, rng, loss_fn, ((ref_loss, ref_metrics), ref_grads) = problem(
        loss_name, negatives
    )
    (loss, metrics), grads = CACHED(encode, loss_fn, params, batch, rng, NUM_CHUNKS)
    assert np.isfinite(float(loss))
    assert_close(loss, ref_loss)
    assert_close(metrics, ref_metrics)
    assert_close(grads, ref_grads)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3
    if loss_name == "gte" and negatives:
        (p_loss, _), p_grads = PLAIN(encode, loss_fn, params, batch, rng, NUM_CHUNKS)
        assert_close(p_loss, ref_loss)
        assert_close(p_grads, ref_grads)


def _loops(batch, rng, num_chunks=NUM_CHUNKS):
    roles, chunks = gradcache._chunked_inputs(batch, num_chunks, None, "data")
    keys = {role: gradcache.chunk_keys(rng, role, chunks[role][1]) for role in roles}
    return gradcache._loops(batch, roles, chunks, keys)


def test_roles_of_one_shape_share_a_chunk_loop():
    """Documents and one hard negative at one length run as one loop (one compiled tower);
    queries with a pool mask, other lengths or K > 1 keep their own. The numbers stay the
    hand-written per-role reference's, dropout keys per role and chunk included."""
    rng = key(7)
    assert _loops(make_batch(), rng) == [("query",), ("doc",), ("neg",)]  # ld != lq, K = 2
    batch = make_batch(n=32, k=1)
    assert _loops(batch, rng) == [("query",), ("doc", "neg")]
    no_prompt = {k: v for k, v in make_batch(k=1, lq=7).items() if k != "query_pool_mask"}
    assert _loops(no_prompt, rng) == [("query", "doc", "neg")]
    params, loss_fn = init_params(), gradcache.make_loss_fn("infonce")
    (ref_loss, _), ref_grads = reference_value_and_grad(params, batch, rng, NUM_CHUNKS, loss_fn)
    (loss, _), grads = CACHED(encode, loss_fn, params, batch, rng, NUM_CHUNKS)
    assert_close(loss, ref_loss)
    assert_close(grads, ref_grads)


def test_dropout_is_on_and_keys_differ_by_chunk_and_role():
    params, batch = init_params(), make_batch()
    rng = key(1)
    inputs = gradcache.role_inputs(batch, "query")
    keys = {role: gradcache.chunk_keys(rng, role, 4) for role in gradcache.ROLES}
    with_dropout = encode(params, inputs, keys["query"][0])
    assert not np.allclose(with_dropout, encode(params, inputs, None), atol=1e-3)
    raw = np.stack([jax.random.key_data(k) for k in keys.values()]).reshape(12, -1)
    assert len({tuple(row) for row in raw}) == 12


def test_gradcache_without_dropout_equals_unchunked_encoder():
    params = init_params(3)
    batch = make_batch(n=32, seed=3)
    loss_fn = gradcache.make_loss_fn("gte")

    def unchunked(p):
        emb = {
            role: encode(p, gradcache.role_inputs(batch, role), None) for role in ("query", "doc")
        }
        neg = gradcache.role_inputs(batch, "neg")
        flat = {k: v.reshape(-1, v.shape[-1]) for k, v in neg.items()}
        emb["neg"] = encode(p, flat, None).reshape(*neg["input_ids"].shape[:2], OUT)
        return loss_fn(emb, batch)

    (ref_loss, _), ref_grads = jax.jit(jax.value_and_grad(unchunked, has_aux=True))(params)
    (loss, _), grads = CACHED(encode, loss_fn, params, batch, None, 4)
    assert_close(loss, ref_loss)
    assert_close(grads, ref_grads)


def test_chunks_keep_the_data_sharding():
    mesh = sharding.make_mesh()
    assert mesh.shape["data"] == 8
    x = jax.device_put(np.arange(64 * 3).reshape(64, 3), sharding.batch_sharding(mesh))
    split = jax.jit(lambda a: gradcache.split_chunks(a, 4))
    chunks = split(x)
    assert chunks.shape == (4, 16, 3)
    assert chunks.sharding.is_equivalent_to(jax.NamedSharding(mesh, P(None, "data")), 3)
    np.testing.assert_array_equal(chunks[1, :, 0], np.arange(1, 64, 4) * 3)
    # Why check the HLO: the strided layout must come free, with no data moved between devices.
    hlo = split.lower(x).compile().as_text()
    for op in ("all-to-all", "all-gather", "collective-permute", "all-reduce"):
        assert op not in hlo
    back = jax.jit(lambda a: gradcache.merge_chunks(a))(chunks)
    np.testing.assert_array_equal(back, x)
    assert back.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)


@pytest.mark.parametrize("negatives", [False, True])
def test_gradcache_on_8_device_mesh_equals_one_device(negatives):
    params, batch, rng, loss_fn, ((ref_loss, ref_metrics), ref_grads) = problem("gte", negatives)
    mesh = sharding.make_mesh()
    g_batch = sharding.global_batch(batch, mesh)
    g_params = sharding.shard_params(params, mesh)
    assert g_batch["query_input_ids"].sharding.spec == P("data")
    step = jax.jit(
        lambda p, b, r: gradcache.cached_value_and_grad(
            encode, loss_fn, p, b, r, NUM_CHUNKS, mesh=mesh
        ),
        out_shardings=sharding.replicated(mesh),
    )
    (loss, metrics), grads = step(g_params, g_batch, rng)
    assert_close(loss, ref_loss)
    assert_close(metrics, ref_metrics)
    assert_close(grads, ref_grads)


def test_chunk_smaller_than_the_data_axis_is_refused():
    params, batch, rng, loss_fn, _ = problem("gte", False)
    with pytest.raises(ValueError, match="multiple of the 'data' axis"):
        gradcache.cached_value_and_grad(
            encode, loss_fn, params, batch, rng, 8, mesh=sharding.make_mesh()
        )
