"""Every documented example that names a config file under configs/ loads: the file exists and its
`--config.a.b=v` overrides name real keys with values of the right type.

Scanned: the Markdown docs, the config files' and modules' docstrings, `launch/tpu_pod.sh --help`
and every `gte-jax <command> --help`. An override written on its own (prose, a flag's help) is
checked against the config file it documents, else against configs/finetune.py.
(launch/slurm_gpu.sbatch's comments are scanned too.)
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import subprocess

import pytest

from gte_jax import cli
from gte_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/finetune.py"
CONFIG_RE = re.compile(r"(?:--config[ =]|\bCONFIG=)(configs/[\w./-]+\.py(?::\w+)?)")
OVERRIDE_RE = re.compile(r"""--config\.([\w.]+)=('[^']*'|"[^"]*"|[^\s`'"\])]+)""")
QUOTES = "\"'"
PLACEHOLDER_KEYS = {"a.b"}  # the syntax itself: `--config.a.b=value`


def _help_texts() -> dict[str, str]:
    texts = {}
    for argv in [[name] for name in cli.SUBCOMMANDS] + [["data", "inspect"], ["data", "build"]]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        texts[f"gte-jax {' '.join(argv)} --help"] = out.getvalue()
    run = subprocess.run(
        ["bash", str(REPO / "launch" / "tpu_pod.sh"), "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    texts["launch/tpu_pod.sh --help"] = run.stdout
    return texts


def _documents() -> list[tuple[str, str, bool]]:
    """(name, text, whether lone overrides in it are examples) for everything scanned."""
    docs = [
        REPO / "README.md",
        *sorted((REPO / "launch").glob("*.md")),
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "benchmarks").glob("*.md")),
        *sorted((REPO / "configs").glob("*.py")),
        REPO / "launch" / "slurm_gpu.sbatch",
    ]
    out = [(str(p.relative_to(REPO)), p.read_text(encoding="utf-8"), True) for p in docs]
    # Module docstrings and help strings: full commands only (config.py explains the syntax).
    for path in sorted((REPO / "gte_jax").rglob("*.py")):
        out.append((str(path.relative_to(REPO)), path.read_text(encoding="utf-8"), False))
    out += [(name, text, True) for name, text in _help_texts().items()]
    return out


def _logical_lines(text: str):
    """(first line number, line) with shell continuations (a trailing backslash) joined."""
    start, parts = 0, []
    for number, line in enumerate(text.splitlines(), 1):
        start = start or number
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        yield start, " ".join([*parts, line])
        start, parts = 0, []


def _examples() -> list[tuple[str, str, list[str]]]:
    """(where, config spec, overrides) for every example found."""
    found = []
    for name, text, lone_ok in _documents():
        own = name if name.startswith("configs/") else DEFAULT_CONFIG
        for number, line in _logical_lines(text):
            configs = list(CONFIG_RE.finditer(line))
            overrides = [
                (m.start(), f"--config.{key}={value.strip(QUOTES)}")
                for m in OVERRIDE_RE.finditer(line)
                for key, value in [m.groups()]
                if key not in PLACEHOLDER_KEYS
            ]
            where = f"{name}:{number}"
            if not configs:
                if overrides and lone_ok:
                    found.append((where, own, [o for _, o in overrides]))
                continue
            for i, m in enumerate(configs):  # a command's overrides follow its --config
                end = configs[i + 1].start() if i + 1 < len(configs) else len(line)
                mine = [o for start, o in overrides if m.end() <= start < end]
                found.append((where, m.group(1), mine))
    return found


EXAMPLES = _examples()


def test_the_scan_finds_the_known_examples():
    wheres = {where.split(":")[0] for where, _, _ in EXAMPLES}
    assert {"README.md", "launch/README.md", "launch/tpu_pod.sh --help"} <= wheres
    assert any(o for _, spec, o in EXAMPLES if spec == "configs/finetune.py")
    assert "gte-jax train --help" in wheres  # its epilog's override example


@pytest.mark.parametrize("where,spec,overrides", EXAMPLES, ids=[f"{w} {s}" for w, s, _ in EXAMPLES])
def test_documented_example_loads(where, spec, overrides):
    load_config(REPO / spec, overrides)


def test_documented_sts_example_is_what_the_reader_reads(tmp_path):
    from gte_jax.evaluation import read_sts

    page = (REPO / "docs" / "inference.md").read_text(encoding="utf-8")
    block = re.search(r"An STS file.*?```jsonl\n(.*?)```", page, re.S)
    assert block, "docs/inference.md shows no STS example"
    path = tmp_path / "sts.jsonl"
    path.write_text(block.group(1), encoding="utf-8")
    first, second, scores = read_sts(path)
    assert len(first) == len(second) == len(scores) == 2 and scores[0] > scores[1]


# ------------------------------------------------------ the README's and docs/'s fenced commands
# Every `gte-jax ...` line of a fenced shell block in README.md and docs/*.md is checked: its command exists and
# every flag it passes is one its `--help` lists (overrides and configs: test_documented_example_loads).
# What needs no network and no earlier output also runs: here, with a smaller override where the
# command takes minutes, or in the test named below. `pip install` and the whole suite's pytest line
# are what CI itself runs (.ci/run); they are not re-run here.
RUN_HERE = {  # README command -> the overrides this test adds (later flags win in argparse)
    "gte-jax data inspect --config configs/gte_base_pretrain.py:runlocal --steps 200": [
        "--steps",
        "20",
    ],
}
RUN_ELSEWHERE = {  # a config spec the command trains -> the test file that runs that training
    "configs/e5_mistral.py:runlocal": "test_llm_recipes.py",
    "configs/llm2vec.py:runlocal": "test_llm2vec.py",
    "configs/instructor.py:runlocal": "test_instructor_recipe.py",
}
VALIDATED_ONLY = {  # needs no network, but takes minutes on 2 cores: parsed and validated only
    "configs/demo.py": "the two-stage demo (3-4 min)",
    "configs/gte_qwen2.py:runlocal": "the same code path as e5_mistral.py:runlocal, run elsewhere",
    "configs/e5_mistral.py": "`gte-jax plan` of Mistral-7B: 12-34 min of AOT compile per depth",
}
# What a command needs that a fresh checkout has not: a download, a placeholder, a service, or the
# output of an earlier command in the README.
NEEDS = ("data build", "/path/to", "path/to/", "BUCKET", "localhost", "runs/", "my_model",
         "synth/", "texts.txt", "q.txt", "pairs.jsonl", "corpus.txt", "sts.jsonl", "support_qa")  # fmt: skip


COMMAND_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _readme_commands() -> list[tuple[str, str]]:
    """(page:line, command without its trailing comment) for each `gte-jax` command of a fenced
    shell block in the README and the docs/ pages (a command moved to a page stays checked)."""
    import shlex

    found = []
    for page in COMMAND_PAGES:
        text, name = page.read_text(encoding="utf-8"), str(page.relative_to(REPO))
        for block in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            first = text.count("\n", 0, block.start(1)) + 1
            for offset, line in _logical_lines(block.group(1)):
                words = shlex.split(line, comments=True)
                if words[:1] == ["gte-jax"]:
                    found.append((f"{name}:{first + offset - 1}", shlex.join(words)))
    return found


README_COMMANDS = _readme_commands()
_HELP: dict[tuple[str, ...], str] = {}


def _help(argv: tuple[str, ...]) -> str:
    if argv not in _HELP:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            cli.main([*argv, "--help"])
        assert e.value.code == 0, f"gte-jax {' '.join(argv)} --help failed"
        _HELP[argv] = out.getvalue()
    return _HELP[argv]


def test_the_readme_scan_finds_its_commands():
    assert len(README_COMMANDS) >= 20
    pages = {where.split(":")[0] for where, _ in README_COMMANDS}
    assert {"README.md", "docs/training.md", "docs/synthetic-data.md"} <= pages, pages
    assert any(c in RUN_HERE for _, c in README_COMMANDS), "RUN_HERE names no README command"


@pytest.mark.parametrize("where,command", README_COMMANDS, ids=[w for w, _ in README_COMMANDS])
def test_readme_command_is_valid_and_accounted_for(where, command):
    import shlex

    words = shlex.split(command)[1:]
    assert words[0] in cli.SUBCOMMANDS, f"{where}: unknown command {words[0]!r}"
    nested = words[0] in ("data", "synth") and not words[1].startswith("-")
    help_text = _help(tuple(words[: 2 if nested else 1]))
    for word in words:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and not flag.startswith("--config."):
            assert re.search(rf"{re.escape(flag)}\b", help_text), f"{where}: {flag} not in --help"
    specs = [m.group(1) for m in CONFIG_RE.finditer(command)]
    reasons = [
        command in RUN_HERE,
        any(s in RUN_ELSEWHERE for s in specs),
        any(s in VALIDATED_ONLY for s in specs),
        any(token in command for token in NEEDS),
    ]
    assert any(reasons), f"{where}: `{command}` needs nothing: run it in RUN_HERE or say why not"
    for spec in specs:
        if spec in RUN_ELSEWHERE:
            test_file = (REPO / "tests" / RUN_ELSEWHERE[spec]).read_text(encoding="utf-8")
            name = pathlib.Path(spec.split(":")[0]).name
            assert name in test_file or spec.split(":")[0] in test_file


@pytest.mark.parametrize("command", sorted(RUN_HERE))
def test_readme_offline_command_runs(command, capsys):
    import json
    import shlex

    rc = cli.main([*shlex.split(command)[1:], *RUN_HERE[command]])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    report = json.loads(out.splitlines()[0])
    assert report["steps"] == 20 and set(report["sources"]) == {"bible", "chat_qa", "news"}
