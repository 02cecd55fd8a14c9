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


def test_readme_sts_example_is_what_the_reader_reads(tmp_path):
    from gte_jax.evaluation import read_sts

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"An STS file.*?```jsonl\n(.*?)```", readme, re.S)
    assert block, "README.md shows no STS example"
    path = tmp_path / "sts.jsonl"
    path.write_text(block.group(1), encoding="utf-8")
    first, second, scores = read_sts(path)
    assert len(first) == len(second) == len(scores) == 2 and scores[0] > scores[1]
