"""Packing with GradCache (docs/design.md, "Packing with GradCache"): the chunked packed layout
holds the padded batch's texts; packed GradCache == padded GradCache == plain autodiff on the
8-device mesh (dropout off); with dropout, GradCache == plain on the packed chunks, and 2 processes
x 4 devices build the same global batch (so draw the same masks) as 1 process x 8 devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from simulated import process_tokenizer, run_processes

from gte_jax import gradcache as gc
from gte_jax import sharding as shd
from gte_jax import train
from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.data.sources import SourceOptions, from_files
from gte_jax.models.bert import EncoderConfig
from gte_jax.models.encoder import BiEncoder

BATCH, CHUNKS = 32, 2  # 8 devices: 4 examples per device, 2 per padded chunk and device


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from gte_jax import hf

    return hf.load_tokenizer(minilm_dir)


def _sources():
    return [
        from_files("bible_hn", DEMO_DIR / "bible_finetune.jsonl"),  # one hard negative each
        from_files(
            "chat",
            DEMO_DIR / "chat_qa.jsonl",
            options=SourceOptions("query: ", "passage: ", num_negatives=0),
        ),
    ]


def _iterator(tokenizer, **kw):
    args = dict(global_batch_size=BATCH, seed=3, alpha=0.0, query_max_length=32, doc_max_length=48)
    args["include_prompt"] = False  # pool masks on every role: they must survive packing too
    return PairBatchIterator(_sources(), tokenizer, **{**args, **kw})


def _chunked_texts(batch, role, key="input_ids"):
    """Each text's tokens (or pool mask) read back through chunk_index -> slot_index -> rows."""
    ids, seg = batch[f"{role}_{key}"], batch[f"{role}_segment_ids"]  # [D*R, C, L]
    slots = batch[f"{role}_slot_index"]  # [D*S, C]
    n, length = slots.shape[0], ids.shape[-1]
    out = []
    for index in batch[f"{role}_chunk_index"].reshape(-1):
        c, p = divmod(int(index), n)
        row, s = divmod(int(slots[p, c]), length)
        out.append(ids[row, c][seg[row, c] == s + 1].tolist())
    return out


def _unpadded(batch, role, key="input_ids"):
    ids, mask = batch[f"{role}_{key}"], batch[f"{role}_attention_mask"]
    ids, mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
    return [row[m == 1].tolist() for row, m in zip(ids, mask, strict=True)]


def test_chunked_packed_batch_holds_the_padded_batch_texts(tokenizer):
    padded = _iterator(tokenizer)
    packed = _iterator(tokenizer, packing=True, pack_groups=8, pack_chunks=CHUNKS)
    seen_chunks = set()
    for _ in range(6):
        ref, got = next(padded), next(packed)
        for role in ("query", "doc", "neg"):
            if f"{role}_input_ids" not in ref:
                assert f"{role}_input_ids" not in got
                continue
            rows, slots = got[f"{role}_input_ids"], got[f"{role}_slot_index"]
            c = rows.shape[1]
            seen_chunks.add(c)
            assert 1 <= c <= CHUNKS and slots.shape[1] == c
            assert rows.shape[0] % 8 == 0 and slots.shape[0] % 8 == 0  # same per device
            assert got[f"{role}_chunk_index"].shape == ref[f"{role}_input_ids"].shape[:-1]
            assert _chunked_texts(got, role) == _unpadded(ref, role)
            assert _chunked_texts(got, role, "pool_mask") == _unpadded(ref, role, "pool_mask")
            assert got[f"{role}_attention_mask"].sum() == ref[f"{role}_attention_mask"].sum()
            # a device's examples lie in its own rows and slot entries
            d_rows, d_slots = rows.shape[0] // 8, slots.shape[0] // 8
            index = got[f"{role}_chunk_index"]
            device = (index % (8 * d_slots)) // d_slots
            per = index.shape[0] // 8
            np.testing.assert_array_equal(device, (np.arange(index.shape[0]) // per).reshape(
                (-1,) + (1,) * (index.ndim - 1)) + 0 * device)  # fmt: skip
            chunk_rows = slots // rows.shape[-1]  # [D*S, C] row of each entry within its chunk
            assert (chunk_rows // d_rows == (np.arange(slots.shape[0]) // d_slots)[:, None]).all()
        for key in ("query_text_id", "doc_text_id", "neg_text_id", "neg_valid", "valid"):
            if key in ref:
                np.testing.assert_array_equal(got[key], ref[key])
    assert CHUNKS in seen_chunks  # the docs need both chunks; short queries fit in one


def _two_processes(tokenizer, steps):
    """Chunk-packed batches of 2 simulated processes x 4 devices (threads; real all-gathers)."""

    def run(p, agree):
        it = _iterator(
            process_tokenizer(tokenizer), packing=True, pack_groups=4, pack_chunks=CHUNKS,
            process_index=p, process_count=2, agree_lengths=agree,
        )  # fmt: skip
        return [next(it) for _ in range(steps)]

    out = run_processes(run)
    return [
        {k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(out[0], out[1], strict=True)
    ]


def _tiny_step_fns():
    config = EncoderConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    model = BiEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(0))
    model_fn, params = train.ModelFn.from_module(model)
    embed_fn = train.make_embed_fn(model_fn)
    loss_fn = gc.make_loss_fn("gte", temperature=0.05)
    mesh = shd.make_mesh()

    def make(cached, num_chunks, gather=None):
        fn = gc.cached_value_and_grad if cached else gc.plain_value_and_grad
        kwargs = {"gather": gather} if gather else {}
        return jax.jit(
            lambda p, b, r: fn(embed_fn, loss_fn, p, b, r, num_chunks, mesh=mesh, **kwargs),
            out_shardings=shd.replicated(mesh),
        )

    return shd.shard_params(params, mesh), mesh, make


def _assert_close(a, b, rtol=1e-4, atol=1e-6):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        scale = max(1.0, float(np.abs(np.asarray(y)).max()))
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol * scale,
            err_msg=jax.tree_util.keystr(path),
        )  # fmt: skip


def test_packed_gradcache_equals_padded_gradcache_equals_plain(tokenizer):
    """Dropout off (its masks are drawn per layout). Loss, metrics and gradients on 8 devices."""
    params, mesh, make = _tiny_step_fns()
    pairs = zip(
        _iterator(tokenizer),
        _iterator(tokenizer, packing=True, pack_groups=8, pack_chunks=CHUNKS),
        strict=False,  # two endless iterators
    )
    padded, packed = next((a, b) for a, b in pairs if "neg_input_ids" in a)  # hard negatives too
    assert max(packed[f"{r}_input_ids"].shape[1] for r in ("query", "doc", "neg")) == CHUNKS
    g_padded, g_packed = shd.global_batch(padded, mesh), shd.global_batch(packed, mesh)
    (ref_loss, ref_m), ref_g = make(False, 1)(params, g_padded, None)  # plain, whole batch
    for name, fn, batch in [
        ("padded gradcache", make(True, CHUNKS), g_padded),
        ("packed gradcache", make(True, CHUNKS), g_packed),
        ("packed plain", make(False, CHUNKS), g_packed),
    ]:
        (loss, m), g = fn(params, batch, None)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, err_msg=name)
        _assert_close(m, ref_m)
        _assert_close(g, ref_g)
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(ref_g)) > 1e-3


def test_packed_gradcache_with_dropout_is_pure_in_seed_and_step(tokenizer):
    """GradCache == plain on the chunk-packed batch with dropout on (both passes see the same
    masks, also in the per-device backward); the global batch of 2 processes x 4 devices is the one of 1 process x 8 bit for bit,
    so the masks drawn from fold_in(rng, step) on it are the same, and so is the step."""
    steps = 3
    one = _iterator(tokenizer, packing=True, pack_groups=8, pack_chunks=CHUNKS)
    ref = [next(one) for _ in range(steps)]
    two = _two_processes(tokenizer, steps)
    for a, b in zip(ref, two, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    params, mesh, make = _tiny_step_fns()
    rng = jax.random.fold_in(jax.random.key(0), 7)  # (seed 0, step 7), as make_train_step
    i = next(i for i, b in enumerate(ref) if "neg_input_ids" in b)
    batch = shd.global_batch(ref[i], mesh)
    (loss, _), g = make(True, CHUNKS)(params, batch, rng)
    (p_loss, _), p_g = make(False, CHUNKS)(params, batch, rng)
    np.testing.assert_allclose(float(loss), float(p_loss), rtol=1e-5)
    _assert_close(g, p_g)
    # The per-device backward with one reduction (sharding.gather_params): each device's
    # slots, the masks of the global rows.
    _, o_g = make(True, CHUNKS, "per_chunk")(params, batch, rng)
    _assert_close(o_g, p_g)
    (n_loss, _), _ = make(True, CHUNKS)(params, batch, None)
    assert abs(float(n_loss) - float(loss)) > 1e-6  # dropout was on
    (t_loss, _), t_g = make(True, CHUNKS)(params, shd.global_batch(two[i], mesh), rng)
    assert float(t_loss) == float(loss)
    for x, y in zip(jax.tree.leaves(t_g), jax.tree.leaves(g), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
