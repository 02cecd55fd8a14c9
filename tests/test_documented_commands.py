"""Inference embeds instructions as training formatted them: every ``gte-jax encode`` / ``eval``
command in a config's docstring (configs/*.py), run on a tiny export that records what training
on that config's sources records (its prompts and instruction templates), prepends exactly the
prompt the training side (``SourceOptions.query_prompt``) gives the same instruction. And the
one rule (``gte_jax.prompts.resolve_template``) in encode, eval and mine: the template comes from
the export; a different ``--template`` exits 2 with one line."""

from __future__ import annotations

import ast
import json
import pathlib
import shlex

import pytest

from gte_jax import cli, hf
from gte_jax.config import load_config
from gte_jax.data.pipeline import build_sources
from gte_jax.encode import Embedder
from gte_jax.prompts import INSTRUCTION_TEMPLATES, training_prompts, training_templates

REPO = pathlib.Path(__file__).resolve().parents[1]
MEDI_FIXTURE = REPO / "tests" / "fixtures" / "medi" / "medi-data.json"
QUERIES = ["what is jax", "who wrote genesis"]
E5_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def documented_commands() -> list[tuple[str, list[str]]]:
    """(config file name, argv after "gte-jax") of each encode / eval command in a docstring."""
    out = []
    for path in sorted((REPO / "configs").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        for line in doc.replace("\\\n", " ").splitlines():
            words = shlex.split(line.strip()) if line.strip().startswith("gte-jax ") else []
            if words[1:2] in (["encode"], ["eval"]):
                out.append((path.name, words[1:]))
    return out


COMMANDS = documented_commands()


def test_the_documented_commands_are_found():
    assert {"e5_mistral.py", "instructor.py"} <= {name for name, _ in COMMANDS}


def _sources(config_name: str, tmp_path: pathlib.Path):
    """The config's (full recipe's) sources, over tiny stand-in files of their formats."""
    config = load_config(str(REPO / "configs" / config_name))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    specs = []
    for spec in config.data.sources:
        spec = dict(spec)
        spec["path"] = str(MEDI_FIXTURE if spec.get("format") == "medi" else pairs)
        specs.append(spec)
    data = config.data.copy_and_resolve_references()
    data.sources = specs
    return build_sources(data)


def _export(tiny_model_dir, path, sources=None, templates=None):
    model, tokenizer, info = hf.load_pretrained(tiny_model_dir)
    if sources is not None:
        info.prompts = training_prompts(sources)  # what train.py records, by the same functions
        info.instruction_templates = training_templates(sources)
    if templates is not None:
        info.instruction_templates = templates
    return hf.export_pretrained(model, tokenizer, path, info=info)


@pytest.fixture
def prefixes(monkeypatch):
    """The prefixes Embedder.encode is called with (the text embedded is prefix + text)."""
    seen: list[str] = []
    encode = Embedder.encode

    def spy(self, texts, *args, **kwargs):
        seen.append(kwargs.get("prefix", ""))
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(Embedder, "encode", spy)
    return seen


def _beir(tmp_path: pathlib.Path) -> pathlib.Path:
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n" for i, q in enumerate(QUERIES))
    )
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(3))
    )
    (beir / "qrels" / "test.tsv").write_text("q0\td0\t1\nq1\td1\t1\n")
    return beir


def _run(argv, export, tmp_path):
    """argv with the model, input, output and data paths pointed at tmp files."""
    argv = list(argv)
    (tmp_path / "q.txt").write_text("\n".join(QUERIES) + "\n")
    where = {
        "--model": str(export),
        "--input": str(tmp_path / "q.txt"),
        "--output": str(tmp_path / "q.npy"),
        "--beir": str(_beir(tmp_path)),
    }
    for i, word in enumerate(argv[:-1]):
        if word in where:
            argv[i + 1] = where[word]
    return cli.main(argv)


@pytest.mark.parametrize("config_name,argv", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_documented_command_embeds_the_training_prompt(
    config_name, argv, tiny_model_dir, tmp_path, prefixes
):
    sources = _sources(config_name, tmp_path)
    export = _export(tiny_model_dir, tmp_path / "export", sources)
    instruction = argv[
        argv.index("--instruction" if argv[0] == "encode" else "--query-instruction") + 1
    ]
    # What training gives a query with this instruction, in every source that formats one.
    trained = {s.options.query_prompt(instruction) for s in sources if training_templates([s])}
    assert len(trained) == 1, trained
    assert _run(argv, export, tmp_path) == 0
    assert prefixes and prefixes[0] == trained.pop()


def test_encode_takes_the_template_from_the_export(tiny_model_dir, tmp_path, prefixes, capsys):
    e5 = _export(tiny_model_dir, tmp_path / "e5", templates=[INSTRUCTION_TEMPLATES["e5"]])
    base = ["encode", "--model", str(e5), "--input", "x", "--output", "x"]
    assert _run([*base, "--instruction", E5_TASK], e5, tmp_path) == 0
    assert _run([*base, "--instruction", E5_TASK, "--template", "e5"], e5, tmp_path) == 0
    want = f"Instruct: {E5_TASK}\nQuery: "
    assert prefixes == [want, want]

    capsys.readouterr()
    assert _run([*base, "--instruction", E5_TASK, "--template", "plain"], e5, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not the one the model was trained with" in err

    both = [INSTRUCTION_TEMPLATES["plain"], INSTRUCTION_TEMPLATES["instructor"]]
    several = _export(tiny_model_dir, tmp_path / "several", templates=both)
    assert _run([*base, "--instruction", "Represent the x: "], several, tmp_path) == 2
    assert "pass --template" in capsys.readouterr().err
    assert _run([*base, "--instruction", "Represent the x: ", "--template", "plain"], several, tmp_path) == 0  # fmt: skip
    # A model that records no template (any HF model): the instruction as given.
    plain = _export(tiny_model_dir, tmp_path / "plain")
    assert _run([*base, "--instruction", "query: ", "--template", "e5"], plain, tmp_path) == 0
    assert _run([*base, "--instruction", "query: "], plain, tmp_path) == 0
    assert prefixes[-2:] == ["Instruct: query: \nQuery: ", "query: "]


def test_eval_and_mine_take_the_template_from_the_export(
    tiny_model_dir, tmp_path, prefixes, capsys
):
    e5 = _export(tiny_model_dir, tmp_path / "e5", templates=[INSTRUCTION_TEMPLATES["e5"]])
    want = f"Instruct: {E5_TASK}\nQuery: "
    argv = ["eval", "--model", str(e5), "--beir", "x", "--query-instruction", E5_TASK]
    assert _run(argv, e5, tmp_path) == 0
    assert sorted(set(prefixes)) == ["", want]  # queries instructed, documents bare
    capsys.readouterr()
    assert _run([*argv, "--template", "instructor"], e5, tmp_path) == 2
    assert "not the one the model was trained with" in capsys.readouterr().err

    prefixes.clear()
    (tmp_path / "pairs.jsonl").write_text(
        "".join(
            json.dumps({"query": q, "positive": f"doc {i}"}) + "\n" for i, q in enumerate(QUERIES)
        )  # fmt: skip
    )
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(4))
    )
    mine = ["mine", "--model", str(e5), "--pairs", str(tmp_path / "pairs.jsonl"),
            "--corpus", str(tmp_path / "corpus.jsonl"), "--output", str(tmp_path / "m.jsonl"),
            "--num-negatives", "1", "--query-instruction", E5_TASK]  # fmt: skip
    assert cli.main(mine) == 0
    assert want in prefixes
    assert cli.main([*mine, "--template", "plain"]) == 2


def test_mteb_adapter_takes_the_template_from_the_export(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from gte_jax.mteb_adapter import MTEBEncoder

    e5 = _export(tiny_model_dir, tmp_path / "e5", templates=[INSTRUCTION_TEMPLATES["e5"]])
    embedder = Embedder.from_pretrained(str(e5))
    task = SimpleNamespace(name="MyRetrieval", type="Retrieval", prompt=None)
    enc = MTEBEncoder(embedder, instructions={"MyRetrieval": E5_TASK})
    assert enc.prefix(task, "query") == f"Instruct: {E5_TASK}\nQuery: "
    assert enc.prefix(task, "document") == ""
    with pytest.raises(ValueError, match="not the one the model was trained with"):
        MTEBEncoder(embedder, instruction_template="instructor")
    # A model that records no template keeps the adapter's default: no instructions.
    plain = Embedder.from_pretrained(str(_export(tiny_model_dir, tmp_path / "plain")))
    assert MTEBEncoder(plain, instructions={"MyRetrieval": E5_TASK}).prefix(task, "query") == ""


def test_eval_sets_of_a_training_config_are_checked_at_start_up(tmp_path):
    from gte_jax.evaluation import EvalSuite

    sts = tmp_path / "sts.jsonl"
    sts.write_text(
        "".join(
            json.dumps({"sentence1": "a", "sentence2": b, "score": x}) + "\n"
            for b, x in [("b", 1.0), ("c", 0.0)]
        )  # fmt: skip
    )
    entry = {"name": "dev", "kind": "sts", "path": str(sts), "query_instruction": E5_TASK}
    suite = EvalSuite([{**entry, "instruction_template": "instructor"}])
    with pytest.raises(ValueError, match="eval set 'dev': template 'instructor' is not the one"):
        suite.check_templates([INSTRUCTION_TEMPLATES["e5"]])
    EvalSuite([entry]).check_templates([INSTRUCTION_TEMPLATES["e5"]])
