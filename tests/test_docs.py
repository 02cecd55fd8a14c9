"""The documentation holds together: the configuration page is generated from the schema and
not stale, every page under docs/ is reachable from docs/README.md, every relative link and
#anchor resolves, the README stays a front page, and benchmark table rows stay readable."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from gte_jax import docs_gen

REPO = pathlib.Path(__file__).resolve().parents[1]
README_MAX_CHARS = 15_500
BENCHMARK_ROW_MAX_CHARS = 300


def test_configuration_page_is_not_stale():
    page = REPO / docs_gen.PAGE
    assert page.read_text(encoding="utf-8") == docs_gen.render(), (
        f"{docs_gen.PAGE} is stale: run `{docs_gen.COMMAND}`"
    )


def test_configuration_page_lists_every_key_with_its_range():
    from gte_jax import ranges
    from gte_jax.defaults import stage_config

    text = docs_gen.render()
    keys = [k for k, _ in docs_gen._leaves(stage_config())]
    assert len(keys) > 80
    for key in keys + list(ranges.RANGES):
        assert f"| `{key}` |" in text, key
    row = next(line for line in text.splitlines() if line.startswith("| `loss.temperature` |"))
    assert "`0.01`" in row and "> 0" in row and "| paper |" in row


def test_the_check_command_fails_on_a_stale_page(tmp_path):
    """tools/gen_config_docs.py --check on a page missing one row: exit 1, naming the command;
    on the current page: exit 0."""
    tool = [sys.executable, str(REPO / "tools" / "gen_config_docs.py"), "--check", "--page"]
    page = (REPO / docs_gen.PAGE).read_text(encoding="utf-8")
    stale = tmp_path / "configuration.md"
    stale.write_text("".join(x for x in page.splitlines(True) if "`train.seed`" not in x))
    run = subprocess.run([*tool, str(stale)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and docs_gen.COMMAND in run.stderr, run.stderr
    run = subprocess.run([*tool, str(REPO / docs_gen.PAGE)], capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr
