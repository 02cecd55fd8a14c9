"""Instructions and the pool-mask rule (gte_jax.prompts): templates, instruction tokens left out of
pooling exactly (checked against the tokenizer's own offset_mapping) in padded (right and left)
and packed training batches, in ``encode`` and in the sentence-transformers export; pooling with
left / right padding and packing against NumPy float64; the tokenizer's padding side and EOS."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gte_jax import prompts
from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.data.sources import PairRecord, SourceOptions, from_records
from gte_jax.models.pooling import pool, pool_segments
from gte_jax.prompts import INSTRUCTION_TEMPLATES, resolve_template

INSTR_Q = "Bible verse for retrieving its modern translation"
INSTR_D = "Bible translation for retrieval"
PER_RECORD = "Old Testament verse for finding a parallel"  # a record's own task


def _texts(n=12):
    rows = [json.loads(line) for line in open(DEMO_DIR / "bible_finetune.jsonl")][:n]
    return [r["query"] for r in rows], [r["positive"] for r in rows]


# ---------------------------------------------------------------------------- tokenizers


def _train(tokenizer, vocab_size, specials, model_trainer):
    from tokenizers import trainers

    queries, docs = _texts(300)
    kind = {"bpe": trainers.BpeTrainer, "unigram": trainers.UnigramTrainer}[model_trainer]
    kwargs = {"unk_token": "<unk>"} if model_trainer == "unigram" else {}
    if model_trainer == "bpe":
        from tokenizers import pre_tokenizers

        kwargs["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    tokenizer.train_from_iterator(
        queries + docs + [INSTR_Q, INSTR_D, PER_RECORD] * 20,
        kind(vocab_size=vocab_size, special_tokens=specials, **kwargs),
    )
    return tokenizer


@pytest.fixture(scope="module")
def t5_tokenizer():
    """A Unigram tokenizer built like transformers' T5 conversion: Metaspace, trailing
    whitespace stripped, "</s>" appended."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence(
        [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    _train(tok, 800, ["<pad>", "</s>", "<unk>"], "unigram")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer like Qwen's: no special tokens added, EOS "<|endoftext|>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _train(tok, 1200, ["<|pad|>", "<|endoftext|>"], "bpe")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def bert_tokenizer(minilm_dir):
    from gte_jax import hf

    return hf.load_tokenizer(minilm_dir)


def _tokenizer(request, name):
    return request.getfixturevalue(f"{name}_tokenizer")


# INSTRUCTOR's template ends in ": ", whose space byte-level BPE merges into the text's first word
# ("ĠLot"): refused there (test_a_prompt_the_tokenizer_merges...), so BPE uses Qwen3's form.
TEMPLATES = {"bert": "instructor", "t5": "instructor", "bpe": "qwen3"}


# ---------------------------------------------------------------------------- templates


def test_templates_turn_tasks_into_prompts():
    assert prompts.instruction_prompt("e5", "find it") == "Instruct: find it\nQuery: "
    assert prompts.instruction_prompt("qwen3", "find it") == "Instruct: find it\nQuery:"
    assert prompts.instruction_prompt("instructor", INSTR_D) == (
        "Represent the Bible translation for retrieval: "
    )
    assert prompts.instruction_prompt("<{task}>", "a {b}") == "<a {b}>"
    assert prompts.instruction_prompt("e5", "") == ""
    with pytest.raises(ValueError, match="exactly one"):
        prompts.instruction_prompt("Instruct: {t}", "x")
    opts = SourceOptions(query_instruction="find it", instruction_template="e5")
    assert (opts.query_prompt(), opts.doc_prompt()) == ("Instruct: find it\nQuery: ", "")
    assert opts.query_prompt("other") == "Instruct: other\nQuery: "  # a record's own wins
    with pytest.raises(ValueError, match="set one"):
        SourceOptions(query_prefix="query: ", query_instruction="find it")
    src = from_records("bible", [PairRecord("q", "d")], options=opts)
    assert prompts.training_prompts([src]) == {"query": "Instruct: find it\nQuery: "}


def test_bad_template_in_a_config_is_a_config_error():
    import ml_collections

    from gte_jax.data.pipeline import build_sources
    from gte_jax.errors import ConfigError

    data = ml_collections.ConfigDict(
        {
            "train_files": "",
            "sources": [
                {
                    "path": str(DEMO_DIR / "chat_qa.jsonl"),
                    "query_instruction": "x",
                    "instruction_template": "Represent the {domain}",
                }
            ],
            "data_dir": "",
            "on_bad_input": "skip",
            "max_text_chars": 1000,
        }
    )
    with pytest.raises(ConfigError, match="chat_qa.*exactly one"):
        build_sources(data)


# ---------------------------------------------------------------------------- pool masks


def offsets_reference(tokenizer, prompt: str, text: str) -> list[int | None]:
    """Per token of ``prompt + text``, by the tokenizer's offsets alone: 0 (not pooled) for a
    token holding a non-space character of the prompt, or a special token before the text
    ([CLS], <s>); 1 for one holding a character of the text, or a special token after it (the
    [SEP] / EOS that last-token pooling reads); None for a token of the prompt's trailing spaces
    alone (tokenizers differ on whose it is: "▁" before "L", "Ġ" before "And")."""
    enc = tokenizer(prompt + text, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    head, out, seen_text = len(prompt.rstrip()), [], False
    for i, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        if i in special:
            out.append(1 if seen_text else 0)
        elif end > len(prompt):
            seen_text = True
            out.append(1 if start >= head else "straddles")
        else:
            out.append(0 if start < head else None)
    return out


def _assert_mask_matches(mask, reference, where):
    assert "straddles" not in reference, where
    assert sum(r is None for r in reference) <= 1, where
    assert [m for m, r in zip(mask, reference, strict=True) if r is not None] == [
        r for r in reference if r is not None
    ], where


def _sources(template, n=12):
    queries, docs = _texts(n)
    records = [
        PairRecord(q, d, (docs[(i + 1) % n],), PER_RECORD if i % 3 == 0 else "")
        for i, (q, d) in enumerate(zip(queries, docs, strict=True))
    ]
    opts = SourceOptions(
        query_instruction=INSTR_Q, doc_instruction=INSTR_D, instruction_template=template
    )
    return [from_records("bible", records, options=opts)]


def _packed_texts(ids, segments, pool_mask, slots):
    """(token ids, pool mask) of the text in each packed slot ``row * length + s``."""
    out = []
    for slot in slots:
        r, s = divmod(int(slot), ids.shape[-1])
        here = segments[r] == s + 1
        out.append((list(ids[r][here]), list(pool_mask[r][here])))
    return out


def _real_rows(ids, attention, pool_mask):
    """Per row: (real token ids, their pool mask), whichever side the row is padded on."""
    return [
        (list(ids[r][attention[r] == 1]), list(pool_mask[r][attention[r] == 1]))
        for r in range(ids.shape[0])
    ]


@pytest.mark.parametrize("layout", ["right", "left", "packed", "packed_chunks"])
@pytest.mark.parametrize("name", ["bert", "t5", "bpe"])
def test_training_pool_masks_equal_the_tokenizers_offsets(request, name, layout):
    tok = _tokenizer(request, name)
    tok.padding_side = "left" if layout == "left" else "right"
    it = PairBatchIterator(
        _sources(TEMPLATES[name]),
        tok,
        global_batch_size=12,
        query_max_length=128,
        doc_max_length=128,
        include_prompt=False,
        packing=layout.startswith("packed"),
        pack_chunks=3 if layout == "packed_chunks" else 1,  # GradCache's chunked packed layout
    )
    plan = it.next_plan()
    batch = it.materialize(plan)
    roles = [
        ("query", plan.query_prefixes, plan.queries),
        ("doc", plan.doc_prefixes, plan.docs),
        ("neg", plan.doc_prefixes, [n[0] for n in plan.negatives]),
    ]
    expected = {prompts.instruction_prompt(TEMPLATES[name], t) for t in (INSTR_Q, PER_RECORD)}
    assert set(plan.query_prefixes) == expected  # the records' own tasks, same template
    chunks = []
    for role, prefixes, texts in roles:
        ids, attention = batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"]
        pool_mask = batch[f"{role}_pool_mask"]
        if layout == "packed":  # each text's tokens: its segment of its row
            rows = _packed_texts(ids, batch[f"{role}_segment_ids"], pool_mask,
                                 batch[f"{role}_slot_index"].reshape(-1))  # fmt: skip
        elif layout == "packed_chunks":  # [rows, chunk, length]; chunk_index -> (chunk, slot)
            slots = batch[f"{role}_slot_index"]  # [slots, chunks]
            assert ids.ndim == 3 and slots.shape[1] == ids.shape[1]
            chunks.append(ids.shape[1])  # a role takes the fewest chunks within its budget
            rows = []
            for k in batch[f"{role}_chunk_index"].reshape(-1):
                c, j = divmod(int(k), slots.shape[0])
                rows += _packed_texts(ids[:, c], batch[f"{role}_segment_ids"][:, c],
                                      pool_mask[:, c], [slots[j, c]])  # fmt: skip
        else:
            ids, attention = ids.reshape(-1, ids.shape[-1]), attention.reshape(-1, ids.shape[-1])
            rows = _real_rows(ids, attention, pool_mask.reshape(ids.shape))
            if layout == "left":  # padding sits before the text
                assert (attention[:, -1] == 1).all() and (attention[:, 0] == 0).any()
        for (row_ids, row_mask), prompt, text in zip(rows, prefixes, texts, strict=True):
            assert row_ids == tok(prompt + text)["input_ids"]
            _assert_mask_matches(row_mask, offsets_reference(tok, prompt, text), (role, text))
            assert 0 < row_mask.count(0) < len(row_mask)
    assert layout != "packed_chunks" or max(chunks) > 1


def test_a_prompt_the_tokenizer_merges_with_the_text_is_refused(bpe_tokenizer):
    """Byte-level BPE: "Query: " alone ends in "Ġ", which the text's first word absorbs
    ("Ġthe"): sentence-transformers' rule would leave "the" out of pooling."""
    tok = bpe_tokenizer
    tok.padding_side = "right"
    merged = "Instruct: find the verse\nQuery: "
    assert prompts.offsets_prompt_split(tok, merged, "the end")[1] is False
    with pytest.raises(ValueError, match="merges its end with the text"):
        prompts.check_prompt(tok, merged)
    assert prompts.offsets_prompt_split(tok, merged.rstrip(), " the end")[1] is True
    prompts.check_prompt(tok, prompts.instruction_prompt("qwen3", "find the verse"))
    records = [PairRecord(q, d) for q, d in zip(*_texts(8), strict=True)]
    source = from_records("s", records, options=SourceOptions(query_prefix=merged))
    with pytest.raises(ValueError, match="merges its end"):  # at start-up, not mid-run
        PairBatchIterator([source], tok, global_batch_size=8, include_prompt=False)
    PairBatchIterator([source], tok, global_batch_size=8, include_prompt=True)
    # A record's own instruction too, before the first batch (in-memory sources know them all).
    records[3] = PairRecord(records[3].query, records[3].positive, instruction=merged)
    source = from_records("s", records)
    with pytest.raises(ValueError, match="merges its end"):
        PairBatchIterator([source], tok, global_batch_size=8, include_prompt=False)


# ---------------------------------------------------------------------------- pooling


def _pool_reference(hidden, attention, pool_mask, mode):
    """NumPy float64, one text at a time on its real tokens only (no padding anywhere)."""
    out = []
    for h, a, p in zip(hidden, attention, pool_mask, strict=True):
        real = np.flatnonzero(a)
        h, p = h[real].astype(np.float64), p[real]
        chosen = np.flatnonzero(p)
        if mode == "mean":
            out.append(h[chosen].mean(0))
        elif mode == "cls":
            out.append(h[chosen[0]])
        elif mode == "last":
            out.append(h[chosen[-1]])
        else:  # weighted_mean: weights 1, 2, ... from the first real token
            w = (np.arange(len(real)) + 1.0) * p
            out.append((w[:, None] * h).sum(0) / w.sum())
    return np.stack(out)


@pytest.mark.parametrize("mode", ["mean", "cls", "last", "weighted_mean"])
def test_pooling_left_right_and_packed_equals_numpy(mode):
    rng = np.random.default_rng(0)
    lengths, prompt_lengths, width, dim = [5, 9, 3, 7], [2, 0, 1, 3], 10, 4
    hidden = rng.normal(size=(4, width, dim)).astype(np.float32)
    right = np.zeros((4, width), np.int32)
    left = np.zeros((4, width), np.int32)
    pm_right = np.zeros((4, width), np.int32)
    pm_left = np.zeros((4, width), np.int32)
    for b, (n, p) in enumerate(zip(lengths, prompt_lengths, strict=True)):
        right[b, :n] = 1
        left[b, width - n :] = 1
        pm_right[b, :n] = prompts.pool_mask(n, p)
        pm_left[b, width - n :] = prompts.pool_mask(n, p)
    for attention, pm in ((right, pm_right), (left, pm_left)):
        got = pool(jnp.asarray(hidden), jnp.asarray(attention), mode, pool_mask=jnp.asarray(pm))
        want = _pool_reference(hidden, attention, pm, mode)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    # Packed: the four texts in one row of 24 tokens (+ pads), each pooled on its own segment.
    row = 30
    packed_hidden = np.zeros((1, row, dim), np.float32)
    seg = np.zeros((1, row), np.int32)
    pm_packed = np.zeros((1, row), np.int32)
    start, per_text = 0, []
    for b, (n, p) in enumerate(zip(lengths, prompt_lengths, strict=True)):
        packed_hidden[0, start : start + n] = hidden[b, :n]
        seg[0, start : start + n] = b + 1
        pm_packed[0, start : start + n] = prompts.pool_mask(n, p)
        start += n
    got = pool_segments(
        jnp.asarray(packed_hidden),
        jnp.asarray((seg > 0).astype(np.int32)),
        jnp.asarray(seg),
        mode,
        pool_mask=jnp.asarray(pm_packed),
    )[0, :4]
    per_text = _pool_reference(hidden, right, pm_right, mode)
    np.testing.assert_allclose(np.asarray(got), per_text, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- tokenizer rules


def test_configure_tokenizer_appends_eos_and_pads_left_through_a_save(bpe_tokenizer, tmp_path):
    import copy

    from transformers import AutoTokenizer

    tok = copy.deepcopy(bpe_tokenizer)
    eos = tok.eos_token_id
    assert tok("In the beginning")["input_ids"][-1] != eos
    prompts.configure_tokenizer(tok, padding_side="left", append_eos=True)
    ids = tok("In the beginning")["input_ids"]
    assert ids[:-1] == tok("In the beginning", add_special_tokens=False)["input_ids"]
    assert ids[-1] == eos
    # Truncation keeps the EOS (the post-processor runs after it), as E5-mistral's recipe does.
    assert tok("In the beginning God", truncation=True, max_length=3)["input_ids"][-1] == eos
    before = tok("x")["input_ids"]
    prompts.configure_tokenizer(tok, append_eos=True)  # already ends with EOS: unchanged
    assert tok("x")["input_ids"] == before
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.padding_side == "left"
    assert again("In the beginning")["input_ids"] == ids
    with pytest.raises(ValueError, match="padding_side"):
        prompts.configure_tokenizer(tok, padding_side="middle")


def test_append_eos_keeps_the_special_tokens_already_added(bert_tokenizer):
    import copy

    tok = copy.deepcopy(bert_tokenizer)
    with pytest.raises(ValueError, match="no eos_token"):
        prompts.configure_tokenizer(tok, append_eos=True)
    tok.eos_token = "[unused1]"
    prompts.configure_tokenizer(tok, append_eos=True)
    ids = tok("hello world")["input_ids"]
    assert ids == [tok.cls_token_id, *tok("hello world", add_special_tokens=False)["input_ids"],
                   tok.sep_token_id, tok.eos_token_id]  # fmt: skip


# ---------------------------------------------------------------------------- agreement


def _export(tmp_path, tokenizer, *, pooling, include_prompt, prompts_=None, positions=True):
    """A tiny random BERT exported with ``tokenizer``. ``positions=False`` zeroes its position
    table: BERT's absolute positions make a left-padded text's embedding depend on how many pads
    precede it (in transformers and sentence-transformers too, which pad to the batch's longest
    text, where we pad to a bucket), so left padding is compared on a position-free tower (the
    decoder families it is meant for use RoPE, which only sees relative positions)."""
    from gte_jax import hf
    from gte_jax.models.bert import EncoderConfig
    from gte_jax.models.encoder import BiEncoder
    from tests.conftest import TINY_BERT

    model = BiEncoder(
        EncoderConfig.from_hf(TINY_BERT), pooling=pooling, normalize=True, rngs=nnx.Rngs(0)
    )
    if not positions:
        table = model.encoder.embeddings.position_embeddings.embedding
        table.value = jnp.zeros_like(table.value)
    info = hf.PretrainedInfo(include_prompt=include_prompt, prompts=dict(prompts_ or {}))
    out = tmp_path / "export"
    hf.export_pretrained(model, tokenizer, out, info=info)
    return out


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


def _train_batch_embeddings(embedder, tokenizer, sources):
    """The queries of one training batch, embedded as the train step does (the batch's own
    ids, masks and pool masks through the model)."""
    it = PairBatchIterator(
        sources,
        tokenizer,
        global_batch_size=len(sources[0]),
        query_max_length=128,
        doc_max_length=128,
        include_prompt=embedder.include_prompt,
    )
    plan = it.next_plan()
    b = it.materialize(plan)
    out = embedder.model.embed(
        jnp.asarray(b["query_input_ids"]),
        jnp.asarray(b["query_attention_mask"]),
        None,
        None if embedder.include_prompt else jnp.asarray(b["query_pool_mask"]),
    )
    return plan, np.asarray(out)


@pytest.mark.parametrize(
    "name, pooling, padding_side, append_eos",
    [
        ("bert", "mean", "right", False),
        ("bpe", "last", "left", True),
        ("t5", "mean", "left", False),
    ],
)
def test_training_batch_encode_and_st_export_agree(
    request, tmp_path, name, pooling, padding_side, append_eos
):
    import copy

    from sentence_transformers import SentenceTransformer

    from gte_jax.commands import encode as encode_cmd
    from gte_jax.encode import Embedder

    tok = prompts.configure_tokenizer(
        copy.deepcopy(_tokenizer(request, name)), padding_side=padding_side, append_eos=append_eos
    )
    template = TEMPLATES[name]
    instruction = prompts.instruction_prompt(template, INSTR_Q)
    export = _export(
        tmp_path,
        tok,
        pooling=pooling,
        include_prompt=False,
        prompts_={"query": instruction},
        positions=padding_side == "right",
    )
    embedder = Embedder.from_pretrained(export)
    assert embedder.left_pad == (padding_side == "left")
    queries, docs = _texts(8)
    ours = embedder.encode(queries, prefix=instruction)
    st = SentenceTransformer(str(export), device="cpu")
    assert st.tokenizer.padding_side == padding_side
    theirs = st.encode(queries, prompt=instruction, convert_to_numpy=True)
    assert _cos(ours, theirs).min() >= 0.99999
    by_name = st.encode(queries, prompt_name="query", convert_to_numpy=True)
    assert _cos(ours, by_name).min() >= 0.99999
    # `gte-jax encode --instruction`: the same task through the same template.
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    rc = encode_cmd.main(
        ["--model", str(export), "--input", str(tmp_path / "q.txt"), "--output",
         str(tmp_path / "q.npy"), "--instruction", INSTR_Q, "--template", template]
    )  # fmt: skip
    assert rc == 0
    assert _cos(np.load(tmp_path / "q.npy"), theirs).min() >= 0.99999
    args = ["--model", str(export), "--input", str(tmp_path / "q.txt"), "--output", "x.npy"]
    assert encode_cmd.main([*args, "--template", "e5"]) == 2  # a template needs an instruction
    # A training batch of the same queries under a source with that instruction.
    opts = SourceOptions(query_instruction=INSTR_Q, instruction_template=template)
    records = [PairRecord(q, d) for q, d in zip(queries, docs, strict=True)]
    plan, trained = _train_batch_embeddings(
        embedder, embedder.tokenizer, [from_records("s", records, options=opts)]
    )
    order = [queries.index(q) for q in plan.queries]
    assert _cos(trained, ours[order]).min() >= 0.99999
    # The exclusion matters: pooling the instruction too gives other embeddings (mean pooling).
    if pooling == "mean":
        pooled_all = Embedder(embedder.model, embedder.tokenizer, include_prompt=True)
        assert _cos(pooled_all.encode(queries, prefix=instruction), ours).min() < 0.999


# ---------------------------------------------------------------------------- MTEB


def test_mteb_adapter_passes_each_tasks_instruction(minilm_dir):
    """Task instructions as mteb's own ``AbsEncoder.get_instruction`` finds them (metadata
    ``prompt`` by prompt type, else the task class's), through our template; ours win."""
    mteb = pytest.importorskip("mteb")
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.types import PromptType

    from gte_jax.encode import Embedder
    from gte_jax.mteb_adapter import MTEBEncoder

    class Reference(AbsEncoder):  # mteb's rule, nothing else
        def encode(self, *args, **kwargs):
            raise NotImplementedError

    reference = Reference()
    embedder = Embedder.from_pretrained(minilm_dir)
    enc = MTEBEncoder(embedder, instruction_template="e5", instruct_documents=True)
    names = ["SciFact", "NFCorpus", "STSBenchmark", "Banking77Classification"]
    for name in names:
        meta = mteb.get_task(name).metadata
        for kind in (PromptType.query, PromptType.document):
            want = reference.get_instruction(meta, kind)
            assert enc.instruction(meta, kind.value) == want, (name, kind)
            expected = prompts.instruction_prompt("e5", want) if want else ""
            assert enc.prefix(meta, kind) == expected
    scifact = mteb.get_task("SciFact").metadata
    assert enc.prefix(scifact, PromptType.query) == (
        "Instruct: Given a scientific claim, retrieve documents that support or refute the claim"
        "\nQuery: "
    )
    own = MTEBEncoder(
        embedder,
        instruction_template="e5",
        instructions={"SciFact": "Find evidence"},
        query_prefix="q: ",
    )
    assert own.prefix(scifact, PromptType.query) == "Instruct: Find evidence\nQuery: "
    assert own.prefix(scifact, PromptType.document) == ""  # documents bare (E5-mistral)
    texts = ["Vitamin D lowers the risk of fractures."]
    np.testing.assert_array_equal(
        own.encode(texts, task_metadata=scifact, prompt_type=PromptType.query),
        embedder.encode(texts, prefix="Instruct: Find evidence\nQuery: "),
    )


def test_eval_sets_take_instructions_like_sources():
    from gte_jax.evaluation import EvalSet

    class Trained:  # an Embedder's template rule, without a model
        def __init__(self, *templates):
            self.recorded = [INSTRUCTION_TEMPLATES[t] for t in templates]

        def instruction_template(self, given=None):
            return resolve_template(self.recorded, given)

    entry = {"name": "dev", "kind": "beir", "path": "x",
             "query_instruction": "Given a claim, find evidence"}  # fmt: skip
    s = EvalSet.from_config({**entry, "instruction_template": "e5"})
    want = ("Instruct: Given a claim, find evidence\nQuery: ", "")
    assert s.prefixes(Trained()) == s.prefixes(Trained("e5")) == want
    opts = SourceOptions(
        query_instruction="Given a claim, find evidence", instruction_template="e5"
    )
    assert s.prefixes(Trained())[0] == opts.query_prompt()  # the one rule
    # No template in the eval set: the model's; a template the model was not trained with: refused.
    assert EvalSet.from_config(entry).prefixes(Trained("e5")) == want
    with pytest.raises(ValueError, match="not the one the model was trained with"):
        s.prefixes(Trained("instructor"))
    with pytest.raises(ValueError, match="query_prefix or query_instruction"):
        EvalSet.from_config(
            {
                "name": "d",
                "kind": "sts",
                "path": "x",
                "query_prefix": "q: ",
                "query_instruction": "t",
            }
        )
