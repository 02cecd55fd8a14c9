"""MNTP (LLM2Vec's masked next-token prediction), data side and loss: the masking rule (pure in
(seed, step, example), never special or first tokens, LLM2Vec's two replacement rules) and
``losses.mntp_loss`` against a NumPy float64 reference and against transformers' own causal-LM
loss of a tiny random Llama on the same masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.mntp import IGNORE, MntpMasking, resolve_mask_token_id
from gte_jax.errors import ConfigError
from gte_jax.losses import mntp_loss

BOS, EOS, PAD, MASK = 1, 2, 0, 3
SPECIAL = frozenset({BOS, EOS, PAD})
VOCAB = 50


def _texts(n=64, seed=0):
    """5..40 ordinary tokens, EOS, with BOS before every other text (tokenizers with and without
    BOS): like a decoder tokenizer's output."""
    rng = np.random.default_rng(seed)
    return [
        [BOS] * (i % 2 == 0) + [*rng.integers(4, VOCAB, rng.integers(5, 40)).tolist(), EOS]
        for i in range(n)
    ]


def reference_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Float64: mean over labels[b, i] != -100 (i >= 1) of -log softmax(logits[b, i - 1])[label]."""
    logits = logits.astype(np.float64)
    terms = []
    for b in range(labels.shape[0]):
        for i in range(1, labels.shape[1]):
            if labels[b, i] != IGNORE:
                row = logits[b, i - 1]
                log_z = row.max() + np.log(np.exp(row - row.max()).sum())
                terms.append(log_z - row[labels[b, i]])
    return float(np.mean(terms)) if terms else 0.0


def _padded(rows, pad):
    out = np.full((len(rows), max(map(len, rows))), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def test_mntp_loss_equals_float64_reference_with_the_shift():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (4, 9, VOCAB)).astype(np.float32)
    labels = np.full((4, 9), IGNORE)
    labels[0, [2, 5, 8]] = [7, 11, 13]
    labels[1, 0] = 9  # position 0 has no position before it: never scored
    labels[2, [1, 4]] = [4, 49]
    loss, m = jax.jit(mntp_loss)(logits, labels)
    expected = reference_loss(logits, labels)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert m["num_masked"] == 5
    # The shift is what makes it MNTP: scoring position i's own logits gives another number.
    unshifted = reference_loss(np.concatenate([logits[:, 1:], logits[:, :1]], axis=1), labels)
    assert abs(unshifted - expected) > 1e-2
    # Gradient: (softmax - onehot) / count at position i - 1 of every scored label i.
    grad = np.asarray(jax.grad(lambda x: mntp_loss(x, labels)[0])(logits), dtype=np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.zeros_like(grad)
    for b, i in zip(*np.nonzero((labels != IGNORE) & (np.arange(9) > 0)), strict=True):
        want[b, i - 1] = p[b, i - 1]
        want[b, i - 1, labels[b, i]] -= 1.0
    np.testing.assert_allclose(grad, want / 5, atol=1e-6)
    # Nothing masked: loss 0, not NaN.
    empty, _ = mntp_loss(logits, np.full((4, 9), IGNORE))
    assert float(empty) == 0.0


def test_mntp_loss_equals_transformers_causal_lm_loss_of_a_tiny_llama():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    masking = MntpMasking(0.3, MASK, SPECIAL, VOCAB, mask_all=False, seed=0)
    texts = _texts(6)
    masked, labels = masking(texts, step=4)
    ids, lab = _padded(masked, PAD), _padded(labels, IGNORE)
    attn = _padded([[1] * len(t) for t in texts], 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn), labels=torch.tensor(lab)
        )
    logits = out.logits.float().numpy()
    ours, metrics = mntp_loss(jnp.asarray(logits), jnp.asarray(lab))
    np.testing.assert_allclose(float(ours), float(out.loss), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(ours), reference_loss(logits, lab), rtol=1e-5)
    assert metrics["num_masked"] == (lab != IGNORE).sum() > 10


def test_masking_rule_all_mask_and_bert():
    texts = _texts(400)
    allm = MntpMasking(0.8, MASK, SPECIAL, mask_all=True, seed=3)
    masked, labels = allm(texts, step=0)
    chosen_total = maskable_total = 0
    for ids, out, lab in zip(texts, masked, labels, strict=True):
        ids, out, lab = map(np.asarray, (ids, out, lab))
        chosen = lab != IGNORE
        assert not chosen[0] and not np.isin(ids[chosen], list(SPECIAL)).any()
        np.testing.assert_array_equal(lab[chosen], ids[chosen])  # labels = original ids
        np.testing.assert_array_equal(out[chosen], MASK)  # all_mask: every chosen one is MASK
        np.testing.assert_array_equal(out[~chosen], ids[~chosen])  # the rest untouched
        chosen_total += chosen.sum()
        maskable_total += len(ids) - 2  # not EOS, not position 0 (BOS or the first token)
    assert abs(chosen_total / maskable_total - 0.8) < 0.02  # ~9000 draws: 5 sigma ≈ 0.02

    bert = MntpMasking(0.2, MASK, SPECIAL, VOCAB, mask_all=False, seed=3)
    masked, labels = bert(texts, step=0)
    kinds = {"mask": 0, "kept": 0, "other": 0}
    for ids, out, lab in zip(texts, masked, labels, strict=True):
        ids, out, lab = map(np.asarray, (ids, out, lab))
        chosen = lab != IGNORE
        kinds["mask"] += (out[chosen] == MASK).sum()
        kinds["kept"] += (out[chosen] == ids[chosen]).sum()
        kinds["other"] += ((out[chosen] != MASK) & (out[chosen] != ids[chosen])).sum()
        np.testing.assert_array_equal(out[~chosen], ids[~chosen])
    total = sum(kinds.values())
    assert abs(total / maskable_total - 0.2) < 0.02
    assert abs(kinds["mask"] / total - 0.8) < 0.04
    # 10 % random ids (a random id equal to the original counts as kept) and 10 % kept.
    assert abs(kinds["other"] / total - 0.1) < 0.03 and abs(kinds["kept"] / total - 0.1) < 0.03


def test_masks_are_a_function_of_seed_step_and_example_not_of_the_split():
    """The global batch masked at once == 8 processes / devices masking their own slices; a new
    step or seed masks other tokens."""
    masking = MntpMasking(0.3, MASK, SPECIAL, seed=7)
    texts = _texts(32)
    whole = masking(texts, step=5)
    parts = [masking(texts[i : i + 4], step=5, first_example=i) for i in range(0, 32, 4)]
    assert [x for p in parts for x in p[0]] == whole[0]
    assert [x for p in parts for x in p[1]] == whole[1]
    assert masking(texts, step=5) == whole  # pure
    assert masking(texts, step=6)[1] != whole[1]
    assert MntpMasking(0.3, MASK, SPECIAL, seed=8)(texts, step=5)[1] != whole[1]


def test_mask_token_resolution_and_bad_settings(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["snake_case names and plain words " * 20], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    assert resolve_mask_token_id(fast) == fast.convert_tokens_to_ids("_")  # LLM2Vec's "blank"
    assert resolve_mask_token_id(fast, "eos") == fast.eos_token_id
    assert resolve_mask_token_id(fast, "eos", 5) == 5
    with pytest.raises(ConfigError, match="no mask token"):
        resolve_mask_token_id(fast, "mask")
    with pytest.raises(ConfigError, match="not a token"):
        resolve_mask_token_id(fast, "<nope>")
    with pytest.raises(ConfigError, match="mask_probability"):
        MntpMasking(0.0, MASK)
    with pytest.raises(ConfigError, match="vocab_size"):
        MntpMasking(0.2, MASK, mask_all=False)


# ------------------------------------------------------------------ the iterator's MNTP batches


def _per_text(batch, n):
    """(masked ids, labels) of each text of a process-local batch, padded or packed."""
    ids, labels = batch["query_input_ids"], batch["query_labels"]
    if "query_slot_index" not in batch:
        mask = batch["query_attention_mask"].astype(bool)
        return [(ids[i][mask[i]].tolist(), labels[i][mask[i]].tolist()) for i in range(n)]
    rows, length = ids.shape
    base = int(batch["query_slot_index"].min()) // length // rows * rows
    out = []
    for slot in batch["query_slot_index"]:
        r, s = divmod(int(slot), length)
        cols = batch["query_segment_ids"][r - base] == s + 1
        out.append((ids[r - base][cols].tolist(), labels[r - base][cols].tolist()))
    return out


@pytest.fixture(scope="module")
def minilm_tok(minilm_dir):
    from gte_jax import hf

    return hf.load_tokenizer(minilm_dir)


def test_iterator_masks_the_query_role_the_same_in_every_layout(minilm_tok):
    """Padded, packed over 8 devices, and 2 processes x 4 devices: every text gets the same
    masked tokens and labels (the rule's own, from its place in the global batch); labels are
    -100 on pads and wherever the tokens are unmasked."""
    from gte_jax.data.mntp import masking_from_config
    from gte_jax.data.pipeline import DEMO_DIR
    from gte_jax.data.sources import from_files
    from gte_jax.defaults import stage_config

    cfg = stage_config().mntp
    cfg.mask_token, cfg.mask_probability = "mask", 0.3
    masking = masking_from_config(cfg, minilm_tok, seed=0)
    assert masking.mask_token_id == minilm_tok.mask_token_id and not masking.mask_all
    src = from_files("news", DEMO_DIR / "news_lead_body.jsonl", text_field="query")
    kw = dict(global_batch_size=16, query_max_length=48, doc_max_length=48, mntp=masking)

    def texts_of(**extra):
        per_process = []
        for p in range(extra.pop("processes", 1)):
            it = PairBatchIterator([src], minilm_tok, **kw, **extra, process_index=p)
            it.sampler.step = 3  # any step: the masks follow it
            plan = it.next_plan()
            per_process += _per_text(it.materialize(plan), len(plan.queries) // it.process_count)
        return plan, per_process

    plan, padded = texts_of()
    _, packed = texts_of(packing=True, pack_groups=8)
    _, split = texts_of(packing=True, pack_groups=4, processes=2, process_count=2)
    assert padded == packed == split
    unmasked = minilm_tok(plan.queries, truncation=True, max_length=48)["input_ids"]
    expected = masking(unmasked, step=3)
    assert [t[0] for t in padded] == expected[0] and [t[1] for t in padded] == expected[1]
    assert sum(np.sum(np.asarray(lab) != IGNORE) for _, lab in padded) > 50
