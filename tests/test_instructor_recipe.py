"""configs/instructor.py:runlocal through `gte-jax train` on a T5 encoder (a tiny random GTR: T5
v1.1 + mean pooling + bias-free Dense + Normalize, transformers' T5Tokenizer): MEDI (one task per
batch) plus a source with INSTRUCTOR templates, instruction tokens not pooled. Checked: the export
in sentence-transformers with the instruction as a prompt reproduces `gte-jax encode
--instruction`; both equal an independent reference (transformers' T5EncoderModel, pooled in
NumPy float64 over the tokens the tokenizer's own offsets place in the text); the training
batches' pool masks exclude exactly the instruction's tokens (offsets again)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import child_env

from gte_jax import prompts
from gte_jax.data.pipeline import DEMO_DIR
from tests.test_instructions import _assert_mask_matches, _cos, _texts, offsets_reference

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"{REPO / 'configs' / 'instructor.py'}:runlocal"
MEDI_FIXTURE = REPO / "tests" / "fixtures" / "medi" / "medi-data.json"
BIBLE_TASK = "Bible verse for retrieving its modern translation"  # the runlocal bible source's


@pytest.fixture(scope="module")
def gtr_cache(tmp_path_factory):
    """The tiny GTR the runlocal config builds, cached in a temporary directory."""
    from gte_jax.models import tiny_gtr

    saved = os.environ.get("GTE_JAX_CACHE")
    os.environ["GTE_JAX_CACHE"] = str(tmp_path_factory.mktemp("gte_jax_cache"))
    try:
        yield tiny_gtr.cached_tiny_gtr()
    finally:
        if saved is None:
            os.environ.pop("GTE_JAX_CACHE")
        else:
            os.environ["GTE_JAX_CACHE"] = saved


@pytest.fixture(scope="module")
def trained(gtr_cache, tmp_path_factory):
    """(workdir, stderr) of `gte-jax train --config configs/instructor.py:runlocal`."""
    env = {**child_env(1), "PYTHONPATH": str(REPO)}
    workdir = tmp_path_factory.mktemp("instructor") / "run"
    cmd = [
        sys.executable, "-m", "gte_jax.cli", "train", "--config", CONFIG,
        "--workdir", str(workdir), "--log_level=WARNING",
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out.stderr


def _medi_instructions() -> set[str]:
    """Every instruction of the MEDI fixture's well-formed records (queries and documents)."""
    out = set()
    for record in json.loads(MEDI_FIXTURE.read_text()):
        for key in ("query", "pos", "neg"):
            if isinstance(record.get(key), list) and len(record[key]) == 2:
                out.add(record[key][0])
    return {p for p in out if isinstance(p, str) and p.startswith("Represent the ")}


def _unusable_medi_records() -> int:
    """Records of the MEDI fixture that cannot train, by the format's own rules checked here
    (not by the reader): an object with a non-empty task_name, query / pos / neg each
    [instruction, text(, 0|1)] with a non-empty text, and neg's instruction equal to pos's."""

    def side_ok(value):
        return (
            isinstance(value, list)
            and len(value) in (2, 3)
            and isinstance(value[0], str)
            and isinstance(value[1], str)
            and value[1].strip() != ""
        )

    def ok(r):
        task = r.get("task_name") if isinstance(r, dict) else None
        if not (isinstance(task, str) and task.strip()):
            return False
        if not all(side_ok(r.get(k)) for k in ("query", "pos", "neg")):
            return False
        return r["neg"][0] == r["pos"][0]

    return sum(not ok(r) for r in json.loads(MEDI_FIXTURE.read_text()))


def test_the_tiny_gtr_is_a_t5_gtr_and_its_instruction_tokens_are_the_prompts(gtr_cache):
    """The base model has GTR's layout, and for T5's tokenizer (SentencePiece-style: the
    prompt's trailing space is dropped, the text's first word gets its own "▁") the
    prompt-length rule counts exactly the tokens the instruction occupies in the joint text."""
    from gte_jax import hf

    modules = json.loads((gtr_cache / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == [
        "Transformer", "Pooling", "Dense", "Normalize"
    ]  # fmt: skip
    config = json.loads((gtr_cache / "config.json").read_text())
    assert config["architectures"] == ["T5EncoderModel"]
    assert config["feed_forward_proj"] == "gated-gelu"
    assert json.loads((gtr_cache / "2_Dense" / "config.json").read_text())["bias"] is False
    tok = hf.load_tokenizer(gtr_cache)
    assert type(tok).__name__ == "T5Tokenizer"
    instructions = _medi_instructions() | {prompts.instruction_prompt("instructor", BIBLE_TASK)}
    assert len(instructions) >= 4
    queries, _ = _texts(6)
    for prompt in sorted(instructions):
        n = prompts.check_prompt(tok, prompt)
        for text in queries:
            reference = offsets_reference(tok, prompt, text)
            assert None not in reference  # T5 strips the prompt's trailing space
            assert n == reference.count(0) == reference.index(1), (prompt, text)


def test_training_pool_masks_exclude_exactly_the_instruction_tokens(gtr_cache):
    """The runlocal layout (packed rows) and padded rows, with T5's tokenizer: each text's pool
    mask equals the tokenizer's offsets' verdict, token by token."""
    from gte_jax import hf
    from gte_jax.data.batching import PairBatchIterator
    from gte_jax.data.sources import PairRecord, SourceOptions, from_records
    from tests.test_instructions import _packed_texts, _real_rows

    tok = hf.load_tokenizer(gtr_cache)
    queries, docs = _texts(8)
    records = [PairRecord(q, d) for q, d in zip(queries, docs, strict=True)]
    opts = SourceOptions(
        query_instruction=BIBLE_TASK,
        doc_instruction="modern Bible translation for retrieval",
        instruction_template="instructor",
    )
    for packing in (True, False):
        it = PairBatchIterator(
            [from_records("bible", records, options=opts)], tok, global_batch_size=8,
            query_max_length=128, doc_max_length=128, include_prompt=False, packing=packing,
        )  # fmt: skip
        plan = it.next_plan()
        batch = it.materialize(plan)
        for role, prefixes, texts in [
            ("query", plan.query_prefixes, plan.queries),
            ("doc", plan.doc_prefixes, plan.docs),
        ]:
            ids, pool_mask = batch[f"{role}_input_ids"], batch[f"{role}_pool_mask"]
            if packing:
                rows = _packed_texts(ids, batch[f"{role}_segment_ids"], pool_mask,
                                     batch[f"{role}_slot_index"].reshape(-1))  # fmt: skip
            else:
                attention = batch[f"{role}_attention_mask"]
                rows = _real_rows(ids, attention, pool_mask.reshape(ids.shape))
            for (row_ids, row_mask), prompt, text in zip(rows, prefixes, texts, strict=True):
                assert prompt.startswith("Represent the ")
                assert row_ids == tok(prompt + text)["input_ids"]
                reference = offsets_reference(tok, prompt, text)
                _assert_mask_matches(row_mask, reference, (role, text))
                assert row_mask.count(0) == reference.count(0) > 5


def _reference_embeddings(export: pathlib.Path, prompt: str, texts: list[str]) -> np.ndarray:
    """transformers' T5EncoderModel on ``prompt + text``, mean-pooled in float64 over the tokens
    the tokenizer's offsets place in the text (its </s> included, as sentence-transformers
    pools it), then the Dense (no bias) and L2 normalisation."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(export)
    model = T5EncoderModel.from_pretrained(export).eval()
    dense = load_file(str(export / "2_Dense" / "model.safetensors"))
    assert set(dense) == {"linear.weight"}
    out = []
    for text in texts:
        ids = tok(prompt + text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0].double().numpy()
        keep = np.array([r == 1 for r in offsets_reference(tok, prompt, text)])
        vector = dense["linear.weight"].astype(np.float64) @ hidden[keep].mean(0)
        out.append(vector / np.linalg.norm(vector))
    return np.stack(out)


def test_instructor_runlocal_trains_t5_and_its_export_reproduces_encode(trained, tmp_path):
    """`gte-jax train --config configs/instructor.py:runlocal` (MEDI fixture, one task per batch,
    a source with instructor templates; include_prompt false) on the tiny GTR, then: the export
    in sentence-transformers with the instruction as ``prompt_name=`` / ``prompt=`` ==
    `gte-jax encode --instruction` == the float64 reference that pools the text tokens alone."""
    from sentence_transformers import SentenceTransformer

    from gte_jax.commands import encode as encode_cmd

    workdir, stderr = trained
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 6 and np.isfinite(summary["final_loss"])
    # Every bad record counts, those that name no task included (the bible source has none).
    assert summary["skipped_records"] == _unusable_medi_records() > 0
    assert "medi-data.json[17]" in stderr  # no task_name: skipped, named in the log
    bible = DEMO_DIR / "bible_finetune.jsonl"
    records = len(json.loads(MEDI_FIXTURE.read_text())) + len(bible.read_text().splitlines())
    sources = summary["sources"].values()
    assert sum(s["used"] for s in sources) + summary["skipped_records"] == records
    base = json.loads((workdir / "base_model" / "config.json").read_text())
    assert base["model_type"] == "t5"
    export = workdir / "export"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["T5EncoderModel"]
    pooling = json.loads((export / "1_Pooling" / "config.json").read_text())
    assert pooling["include_prompt"] is False
    assert json.loads((export / "2_Dense" / "config.json").read_text())["bias"] is False
    st_config = json.loads((export / "config_sentence_transformers.json").read_text())
    prompt = prompts.instruction_prompt("instructor", BIBLE_TASK)
    assert st_config["prompts"]["bible_query"] == prompt

    queries, _ = _texts(6)
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    rc = encode_cmd.main(
        ["--model", str(workdir), "--input", str(tmp_path / "q.txt"), "--output",
         str(tmp_path / "q.npy"), "--instruction", BIBLE_TASK, "--template", "instructor"]
    )  # fmt: skip
    assert rc == 0
    ours = np.load(tmp_path / "q.npy")
    st = SentenceTransformer(str(export), device="cpu")
    by_name = st.encode(queries, prompt_name="bible_query", convert_to_numpy=True)
    assert _cos(ours, by_name).min() >= 0.99999
    by_prompt = st.encode(queries, prompt=prompt, convert_to_numpy=True)
    assert _cos(ours, by_prompt).min() >= 0.99999
    reference = _reference_embeddings(export, prompt, queries)
    assert _cos(ours, reference).min() >= 0.99999
    assert _cos(by_name, reference).min() >= 0.99999
    # The exclusion matters: pooling the instruction's tokens too moves every embedding.
    assert _cos(st.encode([prompt + q for q in queries]), reference).max() < 0.999
    # The training moved the weights: the base model embeds every text further from the export
    # than the equality tolerance above (6 steps on a tiny GTR: cos 0.9993-0.99991 measured).
    base_st = SentenceTransformer(str(workdir / "base_model"), device="cpu")
    assert _cos(base_st.encode(queries, prompt=prompt), by_name).max() < 0.99999


# ----------------------------------------------------------------------------- INSTRUCTOR checkpoints


def _instructor_layout(
    gtr: pathlib.Path, out: pathlib.Path, types: tuple[str, str]
) -> pathlib.Path:
    """The tiny GTR rewritten as the InstructorEmbedding package saves a model (sentence-
    transformers 2.2's save of INSTRUCTOR's modules): modules.json naming its classes, its
    Pooling's config keys (no include_prompt), sentence_bert_config.json, an empty 3_Normalize.
    The weights are safetensors (the original ships pytorch_model.bin: gte-jax never unpickles)."""
    import shutil

    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gtr / name, out / name)
    shutil.copytree(gtr / "2_Dense", out / "2_Dense")
    (out / "3_Normalize").mkdir()
    (out / "1_Pooling").mkdir()
    pooling = json.loads((gtr / "1_Pooling" / "config.json").read_text())
    keys = ["word_embedding_dimension", "pooling_mode_cls_token", "pooling_mode_mean_tokens",
            "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens"]  # fmt: skip
    (out / "1_Pooling" / "config.json").write_text(json.dumps({k: pooling[k] for k in keys}))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 512, "do_lower_case": False})
    )
    versions = {"sentence_transformers": "2.2.2", "transformers": "4.20.0", "pytorch": "1.10.2"}
    (out / "config_sentence_transformers.json").write_text(json.dumps({"__version__": versions}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": types[0]},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": types[1]},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ]  # fmt: skip
    (out / "modules.json").write_text(json.dumps(modules))
    return out


def _instructor_reference(directory: pathlib.Path, instruction: str, texts: list[str]):
    """INSTRUCTOR's own rule (InstructorEmbedding 1.0.1, ``INSTRUCTOR_Transformer.tokenize`` and
    ``forward``), with transformers + torch, in float64: the model reads ``instruction +
    text.strip()``; the first ``len(tokens(instruction.strip())) - 1`` tokens (its </s> not
    counted; none when that is <= 1) are left out of the mean; then the Dense and L2 norm."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(directory)
    model = T5EncoderModel.from_pretrained(directory).eval()
    dense = load_file(str(directory / "2_Dense" / "model.safetensors"))["linear.weight"]
    context = int(sum(tok(instruction.strip())["attention_mask"])) - 1
    context = 0 if context <= 1 else context
    out = []
    for text in texts:
        ids = tok(instruction + text.strip(), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0].double().numpy()
        vector = dense.astype(np.float64) @ hidden[context:].mean(0)
        out.append(vector / np.linalg.norm(vector))
    return np.stack(out)


@pytest.mark.parametrize(
    "types",
    [
        ("InstructorEmbedding.INSTRUCTOR_Transformer", "sentence_transformers.models.Pooling"),
        ("InstructorEmbedding.instructor", "InstructorEmbedding.instructor"),  # the package's save
    ],
)
def test_an_instructor_checkpoint_loads_with_its_instructions_not_pooled(
    gtr_cache, tmp_path, types
):
    """An INSTRUCTOR directory loads (no InstructorEmbedding code runs) as a Transformer whose
    pooling leaves the instruction out: gte-jax's embeddings == INSTRUCTOR's rule, and its
    export (standard sentence-transformers modules, include_prompt false) reproduces them in
    sentence-transformers with the instruction as ``prompt=``."""
    from sentence_transformers import SentenceTransformer

    from gte_jax import hf
    from gte_jax.commands import encode as encode_cmd
    from gte_jax.encode import Embedder

    directory = _instructor_layout(gtr_cache, tmp_path / "instructor", types)
    model, tokenizer, info = hf.load_pretrained(directory)
    assert info.include_prompt is False and info.max_seq_length == 512
    assert model.projection.bias is None and model.normalize and model.pooling == "mean"
    instruction = "Represent the Bible verse for retrieval: "
    queries, _ = _texts(6)
    reference = _instructor_reference(directory, instruction, queries)
    ours = Embedder.from_pretrained(directory).encode(queries, prefix=instruction)
    assert _cos(ours, reference).min() >= 0.99999
    # Pooling the instruction too (a plain sentence-transformers reading) is another embedding.
    pooled_all = Embedder(model, tokenizer, include_prompt=True).encode(queries, prefix=instruction)
    assert _cos(pooled_all, reference).max() < 0.999
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    rc = encode_cmd.main(
        ["--model", str(directory), "--input", str(tmp_path / "q.txt"), "--output",
         str(tmp_path / "q.npy"), "--instruction", instruction]
    )  # fmt: skip
    assert rc == 0 and _cos(np.load(tmp_path / "q.npy"), reference).min() >= 0.99999

    hf.export_pretrained(model, tokenizer, tmp_path / "export", info=info)
    exported = json.loads((tmp_path / "export" / "modules.json").read_text())
    assert all(m["type"].startswith("sentence_transformers.") for m in exported)
    st = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    theirs = st.encode(queries, prompt=instruction, convert_to_numpy=True)
    assert _cos(theirs, reference).min() >= 0.99999


@pytest.mark.parametrize(
    "idx, type_",
    [
        (1, "InstructorEmbedding.INSTRUCTOR_Transformer"),  # INSTRUCTOR's loader: idx 0 only
        (2, "InstructorEmbedding.instructor"),
        (0, "my_package.MyTransformer"),
    ],
)
def test_other_module_types_are_refused_naming_the_file(gtr_cache, tmp_path, idx, type_):
    from gte_jax import hf

    types = ["InstructorEmbedding.INSTRUCTOR_Transformer", "sentence_transformers.models.Pooling"]
    directory = _instructor_layout(gtr_cache, tmp_path / "bad", tuple(types))
    modules = json.loads((directory / "modules.json").read_text())
    modules[idx]["type"] = type_
    (directory / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"modules\.json: module .* is not supported"):
        hf.load_pretrained(directory)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.padding_side=middle", "model.padding_side='middle': use auto, left"),
        ("--config.model.padding_side=left", "absolute position embeddings"),
        ("--config.model.append_eos=true", "no eos_token"),
        ("--config.data.sources=[{'path': 'x.jsonl', 'instruction_template': '{t}'}]", "{task}"),
    ],
)
def test_impossible_instruction_settings_exit_2_at_start_up(
    gtr_cache, tiny_model_dir, tmp_path, capsys, override, message
):
    """On a BERT base (absolute positions, no EOS) the runlocal recipe's impossible settings are
    refused before any step."""
    from gte_jax.commands import train as train_cmd

    rc = train_cmd.main(
        ["--config", CONFIG, "--workdir", str(tmp_path / "run"),
         f"--config.model.init_from={tiny_model_dir}", "--log_level=WARNING", override]
    )  # fmt: skip
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("checkpoints/*"))  # refused before any step
