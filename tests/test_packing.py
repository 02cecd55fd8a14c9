"""Sequence packing: layout invariants, multi-process slices, packed == unpacked embeddings (real
MiniLM, every pooling mode; XLM-R position offset); the train step is in test_packing_train.py."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from simulated import process_tokenizer, run_processes

from gte_jax.data.batching import (
    PairBatchIterator,
    pack_rows,
    packed_arrays,
    pad_ids,
)
from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.data.sources import SourceOptions, from_files
from gte_jax.models.bert import EncoderConfig, segment_positions
from gte_jax.models.encoder import BiEncoder
from gte_jax.models.pooling import POOLING_MODES, pool, pool_segments


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def _texts_of(batch: dict, role: str) -> list[list[int]]:
    """Each example's token ids read back out of a packed batch through slot_index (global rows)."""
    ids, seg = batch[f"{role}_input_ids"], batch[f"{role}_segment_ids"]
    length = ids.shape[1]
    out = []
    for slot in batch[f"{role}_slot_index"].reshape(-1):
        row, s = divmod(int(slot), length)
        out.append(ids[row][seg[row] == s + 1].tolist())
    return out


def _unpadded(batch: dict, role: str) -> list[list[int]]:
    ids, mask = batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"]
    ids, mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
    return [row[m == 1].tolist() for row, m in zip(ids, mask, strict=True)]


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("seed", range(5))
def test_pack_rows_places_every_text_once_within_capacity(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(8, 64))
    lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 80))).tolist()
    rows = pack_rows(lengths, capacity)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    # Best-fit decreasing is within 11/9 OPT + 1 rows; the token count bounds OPT from below.
    assert len(rows) <= 11 / 9 * np.ceil(sum(lengths) / capacity) + 1

    texts = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)]
    arrays = packed_arrays(texts, rows, num_rows=len(rows) + 1, length=capacity, pad_id=0)
    assert arrays["input_ids"].shape == (len(rows) + 1, capacity)
    assert not arrays["attention_mask"][-1].any()  # the rounding row is empty
    np.testing.assert_array_equal(arrays["attention_mask"], arrays["segment_ids"] > 0)
    for i, slot in enumerate(arrays["slot_index"]):
        row, s = divmod(int(slot), capacity)
        here = arrays["segment_ids"][row] == s + 1
        assert arrays["input_ids"][row][here].tolist() == texts[i]
        assert arrays["position_ids"][row][here].tolist() == list(range(lengths[i]))
    np.testing.assert_array_equal(
        np.asarray(segment_positions(jnp.asarray(arrays["segment_ids"])))
        * arrays["attention_mask"],
        arrays["position_ids"],
    )
    with pytest.raises(ValueError, match="more than the packed row length"):
        pack_rows([capacity + 1], capacity)


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
    args = dict(global_batch_size=16, seed=3, alpha=0.0, query_max_length=32, doc_max_length=48)
    args["include_prompt"] = False  # pool masks on every role: they must survive packing too
    return PairBatchIterator(_sources(), tokenizer, **{**args, **kw})


def test_packed_batch_holds_the_same_texts_as_the_padded_one(tokenizer):
    padded, packed = _iterator(tokenizer), _iterator(tokenizer, packing=True, pack_row_multiple=4)
    for _ in range(6):
        ref, got = next(padded), next(packed)
        b = ref["valid"].shape[0]
        for role in ("query", "doc", "neg"):
            if f"{role}_input_ids" not in ref:
                assert f"{role}_input_ids" not in got
                continue
            assert got[f"{role}_input_ids"].shape[0] % 4 == 0
            assert got[f"{role}_slot_index"].shape == ref[f"{role}_input_ids"].shape[:-1]
            assert _texts_of(got, role) == _unpadded(ref, role)
            rows = got[f"{role}_attention_mask"]
            assert rows.shape[1] == (32 if role == "query" else 48)
            assert rows.sum() == ref[f"{role}_attention_mask"].sum()  # no token lost
        for key in ("query_text_id", "doc_text_id", "neg_text_id", "valid"):
            if key in ref:
                np.testing.assert_array_equal(got[key], ref[key])
                assert got[key].shape[0] == b
        for role in ("query", "doc", "neg"):  # prompt exclusion follows the tokens into rows
            if f"{role}_input_ids" not in ref:
                continue
            length = 32 if role == "query" else 48
            pools = []
            for slot in got[f"{role}_slot_index"].reshape(-1):
                row, s = divmod(int(slot), length)
                seg = got[f"{role}_segment_ids"][row] == s + 1
                pools.append(got[f"{role}_pool_mask"][row][seg].tolist())
            ref_mask = ref[f"{role}_attention_mask"].reshape(-1, ref[f"{role}_input_ids"].shape[-1])
            ref_pool = ref[f"{role}_pool_mask"].reshape(ref_mask.shape)
            assert pools == [p[m == 1].tolist() for p, m in zip(ref_pool, ref_mask, strict=True)]


def _two_processes_packed(tokenizer, steps: int) -> dict[int, list]:
    """Packed batches of two simulated processes (threads; the row-count all-gather is real)."""

    def run(p: int, agree):
        it = _iterator(
            process_tokenizer(tokenizer),
            packing=True,
            pack_row_multiple=2,
            process_index=p,
            process_count=2,
            agree_lengths=agree,
        )
        return [next(it) for _ in range(steps)]

    return run_processes(run)


def test_two_processes_pack_complementary_slices(tokenizer):
    steps = 5
    single = _iterator(tokenizer)
    ref = [next(single) for _ in range(steps)]
    out = _two_processes_packed(tokenizer, steps)
    for step in range(steps):
        b0, b1, br = out[0][step], out[1][step], ref[step]
        assert b0.keys() == b1.keys()
        for key in b0:  # same shapes everywhere: the global array is their concatenation
            assert b0[key].shape == b1[key].shape, key
        glob = {k: np.concatenate([b0[k], b1[k]]) for k in b0}
        for role in ("query", "doc", "neg"):
            if f"{role}_input_ids" in br:
                assert _texts_of(glob, role) == _unpadded(br, role)
        np.testing.assert_array_equal(glob["doc_text_id"], br["doc_text_id"])


def test_packed_layout_depends_on_data_devices_not_processes(tokenizer):
    """1 process x 2 devices packs exactly like 2 processes x 1 device (same arrays, bit for
    bit), so dropout masks drawn on the global layout do not depend on the process count."""
    steps = 4
    one = _iterator(tokenizer, packing=True, pack_row_multiple=2, pack_groups=2)
    ref = [next(one) for _ in range(steps)]
    out = _two_processes_packed(tokenizer, steps)
    for step in range(steps):
        glob = {k: np.concatenate([out[0][step][k], out[1][step][k]]) for k in out[0][step]}
        assert glob.keys() == ref[step].keys()
        for key, value in ref[step].items():
            np.testing.assert_array_equal(glob[key], value, err_msg=key)
        # each device's rows hold only its own examples: slots of device g's examples lie in
        # device g's rows
        rows = ref[step]["doc_input_ids"].shape[0] // 2
        b = ref[step]["valid"].shape[0]
        slots = ref[step]["doc_slot_index"] // ref[step]["doc_input_ids"].shape[1]
        assert (slots[: b // 2] < rows).all() and (slots[b // 2 :] >= rows).all()


# ----------------------------------------------------------------------------- model


def _pack_inputs(texts, length, pad_id, pools=None):
    rows = pack_rows([len(t) for t in texts], length)
    a = packed_arrays(texts, rows, num_rows=len(rows), length=length, pad_id=pad_id, pool=pools)
    return {k: jnp.asarray(v) for k, v in a.items()}


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from gte_jax import hf

    model, tok, _ = hf.load_pretrained(minilm_dir)
    return model, tok


def test_packed_embeddings_equal_unpacked_minilm_every_pooling(minilm):
    model, tok = minilm
    sentences = [
        "In the beginning God created the heavens and the earth.",
        "A short one.",
        "How do I reset my password if I no longer have access to my email account?",
        "query: what is the capital of France",
        "The quick brown fox jumps over the lazy dog, again and again and again.",
        "Yes.",
        "Packing puts several texts in one row; attention must stay within each text.",
    ]
    texts = tok(sentences)["input_ids"]
    rng = np.random.default_rng(0)
    # Pool masks that drop a prefix of 0-3 tokens after [CLS] (an instruction), as the data side does.
    pools = [
        [1] + [int(j >= k) for j in range(1, len(t))]
        for t, k in zip(texts, rng.integers(0, 4, len(texts)), strict=True)
    ]
    longest = max(len(t) for t in texts)
    ids, mask = pad_ids(texts, longest, tok.pad_token_id)
    pool_mask, _ = pad_ids(pools, longest, 0)
    packed = _pack_inputs(texts, 48, tok.pad_token_id, pools)
    assert packed["input_ids"].shape[0] < len(texts)  # several texts do share rows
    # The whole BiEncoder path once (mean pooling, prefix excluded) ...
    ref = model.embed(jnp.asarray(ids), jnp.asarray(mask), pool_mask=jnp.asarray(pool_mask))
    got = model.embed(
        packed["input_ids"],
        packed["attention_mask"],
        pool_mask=packed["pool_mask"],
        segment_ids=packed["segment_ids"],
        position_ids=packed["position_ids"],
        slot_index=packed["slot_index"],
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    # ... then every pooling mode, with and without a pool mask, on the two layouts' states.
    hidden = model.encoder(jnp.asarray(ids), jnp.asarray(mask))  # [texts, longest, embed]
    rows = model.encoder(
        packed["input_ids"],
        packed["attention_mask"],
        position_ids=packed["position_ids"],
        segment_ids=packed["segment_ids"],
    )  # [rows, 48, embed]
    for mode in POOLING_MODES:
        for with_pool in (False, True):
            ref = pool(hidden, jnp.asarray(mask), mode, pool_mask=pool_mask if with_pool else None)
            slots = pool_segments(
                rows,
                packed["attention_mask"],
                packed["segment_ids"],
                mode,
                pool_mask=packed["pool_mask"] if with_pool else None,
            )
            got = slots.reshape(-1, slots.shape[-1])[packed["slot_index"]]
            np.testing.assert_allclose(
                np.asarray(got), np.asarray(ref), atol=1e-5, err_msg=f"{mode} pool={with_pool}"
            )


def test_packed_embeddings_equal_unpacked_xlmr_position_offset():
    hf_cfg = {
        "model_type": "xlm-roberta",
        "vocab_size": 300,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 40,  # 38 positions after the offset of 2
        "type_vocab_size": 1,
        "pad_token_id": 1,
        "layer_norm_eps": 1e-5,
    }
    cfg = EncoderConfig.from_hf(hf_cfg)
    assert cfg.position_offset == 2
    rng = np.random.default_rng(1)
    texts = [rng.integers(3, 300, size=int(n)).tolist() for n in (5, 38, 12, 3, 20, 9, 30)]
    longest = max(len(t) for t in texts)
    ids, mask = pad_ids(texts, longest, cfg.pad_token_id)
    packed = _pack_inputs(texts, 38, cfg.pad_token_id)
    graphdef, state = nnx.split(BiEncoder(cfg, pooling="cls", rngs=nnx.Rngs(0)))
    apply = jax.jit(lambda st, *a, **kw: nnx.merge(graphdef, st)(*a, **kw))
    ref = apply(state, jnp.asarray(ids), jnp.asarray(mask))  # HF RoBERTa positions from the pads
    for positions in (packed["position_ids"], None):  # None: derived from segment_ids
        got = apply(
            state,
            packed["input_ids"],
            packed["attention_mask"],
            segment_ids=packed["segment_ids"],
            position_ids=positions,
            slot_index=packed["slot_index"],
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


def test_one_chunk_packing_with_gradcache_chunks_is_refused(tokenizer):
    from gte_jax import gradcache as gc

    it = _iterator(tokenizer, packing=True)
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    with pytest.raises(ValueError, match="pack_chunks=num_chunks"):
        gc.embed_batch(lambda p, x, r: None, None, batch, None, num_chunks=2)


def test_data_inspect_decodes_packed_examples_like_padded_ones(tokenizer):
    from gte_jax.data.cli import _decode_rows

    for packed, padded in zip(
        _iterator(tokenizer, packing=True), itertools.islice(_iterator(tokenizer), 3), strict=False
    ):
        assert _decode_rows(tokenizer, packed, rows=16) == _decode_rows(tokenizer, padded, rows=16)


def test_primed_row_floor_gives_one_shape_and_the_same_texts(tokenizer):
    """Packed row counts fixed at start-up from the data's lengths, so a run compiles
    one train-step program. The batches hold the same texts as without the floor; the shapes of
    the primed batches never change; the floor is part of the resumable state."""
    steps = 8
    plain = _iterator(tokenizer, packing=True, pack_row_multiple=2)
    primed = _iterator(tokenizer, packing=True, pack_row_multiple=2)
    floor = dict(primed.prime_row_floor(steps))
    assert floor and all(n % 2 == 0 for n in floor.values())
    assert primed.sampler.step == 0  # priming consumed nothing
    shapes, plain_shapes = set(), set()
    for _ in range(steps):
        ref, got = next(plain), next(primed)
        for role in ("query", "doc", "neg"):
            if f"{role}_input_ids" in ref:
                assert _texts_of(got, role) == _texts_of(ref, role)
        shapes.add(tuple(sorted((k, v.shape) for k, v in got.items())))
        plain_shapes.add(tuple(sorted((k, v.shape) for k, v in ref.items())))
    per_source = {s.name for s in primed.sources.values()}
    assert len(shapes) <= len(per_source) < len(plain_shapes)  # one shape per batch layout
    assert primed.row_floor == floor  # the primed batches needed no more rows
    state = json.loads(json.dumps(primed.get_state()))
    resumed = _iterator(tokenizer, packing=True, pack_row_multiple=2)
    resumed.set_state(state)
    again, cont = next(resumed), next(primed)
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in cont.items()}
    for key in again:
        np.testing.assert_array_equal(again[key], cont[key])


def test_two_processes_prime_the_same_row_floor(tokenizer):
    def run(p: int, agree):
        it = _iterator(
            process_tokenizer(tokenizer), packing=True, process_index=p, process_count=2,
            agree_lengths=agree, pack_groups=4,
        )  # fmt: skip
        return it.prime_row_floor(6)

    floors = run_processes(run)
    single = _iterator(tokenizer, packing=True, pack_groups=8).prime_row_floor(6)
    assert floors[0] == floors[1]
    # Rows per device: 8 devices either way, each with the same examples.
    assert {k.split("/")[0]: v for k, v in floors[0].items()} == {
        k.split("/")[0]: v for k, v in single.items()
    }


# ----------------------------------------------------------------------------- row length


def _lengths(batch: dict, role: str) -> list[int]:
    mask = batch[f"{role}_attention_mask"]
    return mask.reshape(-1, mask.shape[-1]).sum(-1).tolist()


def test_packed_rows_are_fitted_to_the_primed_texts(tokenizer):
    """Attention over a packed row costs in proportion to its length, so rows are as long
    as the data needs, not the max length: the longest text of the primed batches (read here from
    padded batches of the same steps, an independent path) plus an eighth, in multiples of 8; no
    eighth when the primed batches are the whole run."""
    lengths = dict(query_max_length=128, doc_max_length=256)
    steps = 6
    padded = [next(it) for it in [_iterator(tokenizer, **lengths)] for _ in range(steps)]
    longest = {
        "query": max(max(_lengths(b, "query")) for b in padded),
        "doc": max(
            max(_lengths(b, r)) for b in padded for r in ("doc", "neg") if f"{r}_input_ids" in b
        ),
    }

    def rounded(n, cap):  # up to a multiple of 8, at most the max length
        return min(cap, -(-n // 8) * 8)

    caps = {"query": 128, "doc": 256}
    want = {r: rounded(n + n // 8, caps[r]) for r, n in longest.items()}
    assert want["query"] < 128 and want["doc"] < 256  # the check has teeth on this data
    fitted = _iterator(tokenizer, packing=True, pack_row_length=0, **lengths)
    assert fitted.row_length == {"query": 128, "doc": 256}  # the max lengths until primed
    fitted.prime_row_floor(steps)
    assert fitted.row_length == want
    for ref in padded:
        got = next(fitted)
        for role in ("query", "doc", "neg"):
            if f"{role}_input_ids" in ref:
                width = want["query" if role == "query" else "doc"]
                assert got[f"{role}_input_ids"].shape[-1] == width
                assert _texts_of(got, role) == _unpadded(ref, role)
    assert fitted.row_length == want  # the primed batches fit
    # Primed batches that are the whole run: no headroom.
    whole = _iterator(tokenizer, packing=True, pack_row_length=0, **lengths)
    whole.prime_row_floor(64, run_batches=steps)
    assert whole.row_length == {r: rounded(n, caps[r]) for r, n in longest.items()} != want
    for ref in padded:
        assert _texts_of(next(whole), "query") == _unpadded(ref, "query")
    assert whole.row_length == {r: rounded(n, caps[r]) for r, n in longest.items()}  # all fit
    # Without priming, or not asked for (None: the old layout), rows are the max lengths.
    plain = next(_iterator(tokenizer, packing=True, **lengths))
    assert plain["query_input_ids"].shape[-1] == 128 and plain["doc_input_ids"].shape[-1] == 256


def test_a_text_longer_than_the_rows_switches_the_run_to_the_max_lengths(tokenizer, caplog):
    """A later text longer than the fitted rows is not lost nor cut: that batch and every later one
    are packed into rows of the max lengths (one more shape, logged), each row floor keeping its
    tokens; the switch is part of the resumable state."""
    lengths = dict(query_max_length=128, doc_max_length=256, pack_row_multiple=2)
    it = _iterator(tokenizer, packing=True, pack_row_length=0, **lengths)
    ref = _iterator(tokenizer, **lengths)
    floor = dict(it.prime_row_floor(1))  # one batch: a later one holds a longer text
    fitted = dict(it.row_length)
    assert fitted["query"] < 128 and fitted["doc"] < 256
    for step in range(20):
        with caplog.at_level("WARNING", logger="gte_jax.data.batching"):
            got, want = next(it), next(ref)
        for role in ("query", "doc"):
            assert _texts_of(got, role) == _unpadded(want, role)
        if it.row_length != fitted:
            break
        warned = [r for r in caplog.records if r.levelname == "WARNING"]
        assert got["query_input_ids"].shape[-1] == fitted["query"] and not warned, step
    else:
        pytest.fail("no later text was longer than the rows fitted to the first batch")
    longest = (max(_lengths(want, "query")), max(_lengths(want, "doc")))
    assert longest[0] > fitted["query"] or longest[1] > fitted["doc"]
    assert f"batch {step} holds a text longer than the packed rows" in caplog.text
    assert it.row_length == {"query": 128, "doc": 256}
    assert got["query_input_ids"].shape[-1] == 128 and got["doc_input_ids"].shape[-1] == 256
    # A floor of n rows of the fitted length becomes ceil(n * fitted / max) rows, rounded up.
    for key, n in floor.items():
        short, full = (fitted["query"], 128) if key.startswith("query") else (fitted["doc"], 256)
        assert it.row_floor[key] >= -(-n * short // full) and it.row_floor[key] % 2 == 0
    state = json.loads(json.dumps(it.get_state()))
    assert state["row_length"] == {"query": 128, "doc": 256}
    resumed = _iterator(tokenizer, packing=True, pack_row_length=0, **lengths)
    resumed.prime_row_floor(1)
    resumed.set_state(state)
    again, cont = next(resumed), next(it)
    for key in cont:
        np.testing.assert_array_equal(again[key], cont[key])
    # A state saved before rows were fitted (floors, no lengths) was packed at the max lengths.
    old = _iterator(tokenizer, packing=True, pack_row_length=0, **lengths)
    old.prime_row_floor(1)
    old.set_state({"sampler": state["sampler"], "row_floor": state["row_floor"]})
    assert old.row_length == {"query": 128, "doc": 256}


def test_fixed_rows_shorter_than_a_primed_text_start_at_the_max_lengths(tokenizer, caplog):
    it = _iterator(tokenizer, packing=True, pack_row_length=16)
    assert it.row_length == {"query": 16, "doc": 16}
    with caplog.at_level("WARNING", logger="gte_jax.data.batching"):
        it.prime_row_floor(2)
    assert "longer than the packed rows" in caplog.text
    assert it.row_length == {"query": 32, "doc": 48}
    assert _iterator(tokenizer, packing=True, pack_row_length=40).row_length == {
        "query": 32, "doc": 40,
    }  # fmt: skip
    with pytest.raises(ValueError, match="pack_row_length"):
        _iterator(tokenizer, packing=True, pack_row_length=-1)


def test_two_processes_fit_and_switch_row_lengths_together(tokenizer):
    """Both processes fit the same rows (the longest text over both: here the two halves' longest
    queries of the primed batches fit different rows), and a text longer than the rows on one
    process only switches both in the same batch: shapes agree at every step, and the global
    texts are those of one process holding both slices."""
    lengths = dict(query_max_length=128, doc_max_length=256)

    def run(p: int, agree):
        out = []
        for row_length, primed in ((0, 6), (52, 1)):  # fitted; fixed, longer texts later
            it = _iterator(
                process_tokenizer(tokenizer), packing=True, process_index=p, process_count=2,
                agree_lengths=agree, pack_groups=2, pack_row_length=row_length, **lengths,
            )  # fmt: skip
            it.prime_row_floor(primed)
            fitted = dict(it.row_length)
            out.append((fitted, [next(it) for _ in range(8)], dict(it.row_length)))
        return out

    per_process = run_processes(run)
    for case, (row_length, primed) in enumerate(((0, 6), (52, 1))):
        (fit0, b0, end0), (fit1, b1, end1) = (x[case] for x in per_process)
        single = _iterator(
            tokenizer, packing=True, pack_groups=4, pack_row_length=row_length, **lengths
        )
        single.prime_row_floor(primed)
        assert fit0 == fit1 == single.row_length  # agreed
        for x, y in zip(b0, b1, strict=True):
            ref = next(single)
            assert {k: v.shape for k, v in x.items()} == {k: v.shape for k, v in y.items()}
            for key in ("query_input_ids", "doc_input_ids"):
                np.testing.assert_array_equal(np.concatenate([x[key], y[key]]), ref[key])
        assert end0 == end1 == single.row_length
    assert per_process[0][1][0] == {"query": 52, "doc": 52}
    assert per_process[0][1][2] == {"query": 128, "doc": 256}  # switched
