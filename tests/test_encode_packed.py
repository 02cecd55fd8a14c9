"""Packed encoding (gte_jax/encode.py, ``Embedder.encode(packing=True)``, the default): texts packed
several to a row of the call's max length, one compiled shape per call.

Packed == padded (the ``packing=False`` path) to 1e-5 for a BERT (MiniLM, real weights; token
types laid out with their tokens), a T5 encoder (relative positions per segment) and decoders
(Mistral causal with a sliding window, Gemma3 bidirectional: left padding, EOS appended, last-token
pooling), with and without a prompt excluded from pooling; and against independent references
(sentence-transformers for MiniLM, transformers + torch per text alone for T5 and the decoder,
pooled in NumPy float64). A 300-text corpus of mixed lengths compiles exactly one program.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from tiny_models import DATA, text_lines, tiny_decoder_dir, tiny_t5_dir

from gte_jax import hf
from gte_jax.data.batching import pack_rows
from gte_jax.encode import Embedder, _embed_packed, packed_plan
from gte_jax.prompts import configure_tokenizer

TOL = 1e-5
# Mixed lengths: one word, an empty text, sentences, paragraphs cut at max_length.
TEXTS = [
    "What is AI?",
    "",
    "A new blaze near Goulburn, south-west of Sydney, has forced the closure of the Hume Highway.",
    "Are you sentient? By the strictest dictionary definition of the word, I may be.",
    "Jesus wept.",
    "word " * 90,
    "In the beginning God created the heaven and the earth. " * 3,
    "Hi",
] + text_lines(24)[8:]


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _both(embedder: Embedder, texts, **kwargs):
    padded = embedder.encode(texts, packing=False, **kwargs)
    packed = embedder.encode(texts, **kwargs)
    return packed, padded


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------- the plan


def test_packed_plan_places_every_text_once_in_one_shape():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(1, 60, size=300)) + [64, 64, 1]
    rows_per_batch, slots, batches = packed_plan(lengths, 8, 64)
    assert rows_per_batch == 8
    placed = sorted(i for batch in batches for row in batch for i in row)
    assert placed == list(range(len(lengths)))  # every text once
    for batch in batches:
        assert len(batch) <= rows_per_batch
        assert sum(len(row) for row in batch) <= slots
        assert all(sum(lengths[i] for i in row) <= 64 for row in batch)
    # The rows are the training packer's, dealt k -> batch k % n: counts differ by at most one.
    rows = pack_rows(lengths, 64)
    assert sorted(map(tuple, rows)) == sorted(tuple(r) for b in batches for r in b)
    assert max(map(len, batches)) - min(map(len, batches)) <= 1
    assert len(batches) == -(-len(rows) // 8)
    assert slots == 1 << (max(sum(map(len, b)) for b in batches) - 1).bit_length()
    # A small call gets the next power of two of its rows, not the whole budget.
    assert packed_plan([5, 7, 12], 32, 16)[:2] == (2, 4)
    assert packed_plan([3], 32, 16)[:2] == (1, 1)


# ----------------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Embedder.from_pretrained(minilm_dir)


def test_bert_packed_equals_padded_and_sentence_transformers(minilm, minilm_dir):
    """MiniLM (mean pooling, normalised, max 256 tokens) on mixed lengths; truncation included."""
    from sentence_transformers import SentenceTransformer

    packed, padded = _both(minilm, TEXTS, batch_size=4)
    assert _max_diff(packed, padded) <= TOL
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    assert _max_diff(packed, st.encode(TEXTS, convert_to_numpy=True)) <= 1e-4


@pytest.mark.parametrize("pooling", ["mean", "cls", "last", "weighted_mean"])
def test_bert_pooling_modes_with_an_excluded_prompt(minilm, pooling):
    """Every pooling mode, the prompt's tokens left out of pooling (include_prompt False)."""
    embedder = Embedder(minilm.model, minilm.tokenizer, max_length=64, include_prompt=False)
    assert embedder.prompt_length("query: ") > 1
    packed, padded = _both(embedder, TEXTS, prefix="query: ", pooling=pooling, batch_size=4)
    assert _max_diff(packed, padded) <= TOL
    if pooling != "last":  # the last token ([SEP]) is never a prompt token
        included = Embedder(minilm.model, minilm.tokenizer, max_length=64)
        assert _max_diff(packed, included.encode(TEXTS, prefix="query: ", pooling=pooling)) > 1e-3


class _TypedTokenizer:
    """The MiniLM tokenizer whose token types are 1 on the second half of each text: the packed
    rows must carry each text's types with its tokens (single texts are all type 0 otherwise)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        out = self._tokenizer(*args, **kwargs)
        out["token_type_ids"] = [
            [int(j >= len(x) // 2) for j in range(len(x))] for x in out["input_ids"]
        ]
        return out


def test_bert_token_types_move_with_their_tokens(minilm):
    embedder = Embedder(minilm.model, _TypedTokenizer(minilm.tokenizer), max_length=64)
    packed, padded = _both(embedder, TEXTS, batch_size=4)
    assert _max_diff(packed, padded) <= TOL
    assert _max_diff(packed, minilm.encode(TEXTS, max_length=64)) > 1e-3  # the types count


# ------------------------------------------------------------------- one compile, order, edges


def _corpus(n: int) -> list[str]:
    texts = []
    for name in ("news_lead_body.jsonl", "chat_qa.jsonl"):
        with open(DATA / name, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                texts += [record["query"], record["positive"]]
    return texts[:n]


@pytest.fixture(scope="module")
def tiny_bert(tiny_model_dir):
    return Embedder.from_pretrained(tiny_model_dir)


def test_a_mixed_corpus_compiles_one_program(tiny_bert):
    """300 texts from 5 to several hundred tokens (cut at 128): the padded path runs several
    shapes, the packed path exactly one (the Embedder's counter and jit's own cache agree), its
    last batches padded with empty rows (the plan deals 7 or 8 rows to each batch of 8)."""
    texts = _corpus(300)
    lengths = [len(x) for x in tiny_bert.tokenizer(texts)["input_ids"]]
    assert min(lengths) < 16 and max(lengths) > 128
    padded = tiny_bert.encode(texts, batch_size=8, packing=False)
    assert len(tiny_bert.compiled_shapes) > 3
    tiny_bert.compiled_shapes.clear()
    _, _, batches = packed_plan([min(n, 128) for n in lengths], 8, 128)
    assert {len(batch) for batch in batches} == {7, 8}
    before = _embed_packed._cache_size()
    packed = tiny_bert.encode(texts, batch_size=8)
    (shape,) = tiny_bert.compiled_shapes
    assert shape[:2] == (8, 128)
    assert _embed_packed._cache_size() == before + 1
    assert _max_diff(packed, padded) <= TOL
    tiny_bert.encode(texts[::-1], batch_size=8)  # the corpus in another order: no new program
    assert _embed_packed._cache_size() == before + 1


def test_input_order_empty_call_and_truncation(tiny_bert):
    texts = _corpus(40)
    out = tiny_bert.encode(texts, batch_size=4)
    perm = np.random.default_rng(1).permutation(len(texts))
    np.testing.assert_array_equal(
        tiny_bert.encode([texts[i] for i in perm], batch_size=4), out[perm]
    )
    assert len({tuple(np.round(x, 6)) for x in out}) == len(set(texts))  # no text's vector lost
    # A call of short texts packs rows of its longest text's bucket, not of max_length (128).
    tiny_bert.compiled_shapes.clear()
    tiny_bert.encode(["Hi", "What is AI?"])
    assert tiny_bert.compiled_shapes == {(1, 16, 2)}  # 3 + 6 tokens in one row of 16
    empty = tiny_bert.encode([])
    assert empty.shape == (0, tiny_bert.model.embedding_dim) and empty.dtype == np.float32
    # A text longer than max_length is cut to max_length tokens, as before ([CLS] ... [SEP]).
    long_text = "word " * 200
    cut = tiny_bert.encode([long_text], max_length=16)
    ids = tiny_bert.tokenizer(long_text, truncation=True, max_length=16)["input_ids"]
    assert len(ids) == 16
    np.testing.assert_allclose(
        cut, tiny_bert.encode([long_text], max_length=16, packing=False), atol=TOL
    )
    np.testing.assert_allclose(cut, tiny_bert.encode(["word " * 14], max_length=16), atol=TOL)
    assert _max_diff(cut, tiny_bert.encode([long_text], max_length=32)) > 1e-3


# ----------------------------------------------------------------------------------- T5


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return tiny_t5_dir(tmp_path_factory.mktemp("t5"))


def test_t5_packed_equals_padded_and_transformers(t5_dir):
    """Relative position buckets per segment: packed == padded == transformers' T5EncoderModel on
    each text alone, mean-pooled in float64 (the tiny T5 reaches every bucket at these lengths)."""
    model, tokenizer, info = hf.load_pretrained(t5_dir)
    embedder = Embedder(model, tokenizer, max_length=64)
    packed, padded = _both(embedder, TEXTS, batch_size=4)
    assert _max_diff(packed, padded) <= TOL
    torch_model = transformers.T5EncoderModel.from_pretrained(t5_dir).eval()
    ref = []
    for text in TEXTS:
        ids = tokenizer(text, truncation=True, max_length=64)["input_ids"]
        with torch.no_grad():
            hidden = torch_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        ref.append(hidden.double().numpy().mean(0))
    ref = np.stack(ref)
    assert _max_diff(packed, _l2(ref) if model.normalize else ref) <= TOL

    prompted = Embedder(model, tokenizer, max_length=64, include_prompt=False)
    packed, padded = _both(prompted, TEXTS, prefix="Represent the sentence:", batch_size=4)
    assert _max_diff(packed, padded) <= TOL
    assert _max_diff(packed, embedder.encode(TEXTS, prefix="Represent the sentence:")) > 1e-3


# ----------------------------------------------------------------------------------- decoders


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {
        "mistral": tiny_decoder_dir(root, "mistral", causal_lm=False),  # sliding window 5
        "gemma3_text": tiny_decoder_dir(root, "gemma3_text", causal_lm=False),
    }


def _decoder_embedder(path, attention: str, include_prompt: bool = True) -> Embedder:
    model, tokenizer, _ = hf.load_pretrained(path, attention=attention)
    model.pooling = "last"
    configure_tokenizer(tokenizer, padding_side="left", append_eos=True)
    return Embedder(model, tokenizer, max_length=48, include_prompt=include_prompt)


@pytest.mark.parametrize(
    "family,attention", [("mistral", "causal"), ("gemma3_text", "bidirectional")]
)
def test_decoder_left_padding_last_token_eos(decoder_dirs, family, attention):
    """Left padding + EOS + last-token pooling: the packed text's last token is its EOS; RoPE
    positions restart per text; the masks are block-diagonal (causal / bidirectional)."""
    embedder = _decoder_embedder(decoder_dirs[family], attention)
    assert embedder.left_pad
    packed, padded = _both(embedder, TEXTS, batch_size=4)
    assert _max_diff(packed, padded) <= TOL
    if attention == "causal":  # transformers' causal model on each text alone, last token
        base = transformers.AutoModel.from_pretrained(
            decoder_dirs[family], attn_implementation="eager"
        ).eval()
        ref = []
        for text in TEXTS:
            ids = embedder.tokenizer(text, truncation=True, max_length=48)["input_ids"]
            assert ids[-1] == embedder.tokenizer.eos_token_id or len(ids) == 48
            with torch.no_grad():
                hidden = base(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            ref.append(hidden.double().numpy())
        ref = np.stack(ref)
        assert _max_diff(packed, _l2(ref) if embedder.model.normalize else ref) <= TOL
    prompted = _decoder_embedder(decoder_dirs[family], attention, include_prompt=False)
    prompt = "Instruct: find it\nQuery:"
    packed, padded = _both(prompted, TEXTS, prefix=prompt, pooling="mean")
    assert _max_diff(packed, padded) <= TOL
    assert _max_diff(packed, embedder.encode(TEXTS, prefix=prompt, pooling="mean")) > 1e-3
