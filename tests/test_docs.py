"""The documentation holds together: the configuration page is generated from the schema and
not stale, every page under docs/ is reachable from docs/README.md, every relative link and
#anchor resolves, the README stays a front page, and benchmark table rows stay readable."""

from __future__ import annotations

import pathlib
import re
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


def test_every_config_key_is_labelled_paper_release_or_ours():
    """Recipes are honest: each default's comment says where the value comes from. The
    SOURCE_DEFAULTS fields count too; a key added without a label fails here by name."""
    from gte_jax.defaults import stage_config

    comments = docs_gen.schema_comments()
    groups = {k.rsplit(".", 1)[0] for k, _ in docs_gen._leaves(stage_config()) if "." in k}
    keys = [k for k in comments if not k.startswith("group:") and k not in groups]
    assert any(k.startswith("data.sources[].") for k in keys) and len(keys) > 100
    unlabelled = [k for k in keys if docs_gen.label(comments[k]) == ""]
    assert not unlabelled, f"label these defaults paper / release / ours: {unlabelled}"
    assert docs_gen.label("Ours; the paper says 0.02") == "ours"  # the first label named wins
    assert docs_gen.label("a count of things") == ""


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


# ------------------------------------------------------------------------------ links and anchors
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _pages() -> list[pathlib.Path]:
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        REPO / "benchmarks" / "README.md",
    ]


def _prose(text: str) -> str:
    """The text outside fenced blocks and code spans (where brackets are code, not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(page: pathlib.Path) -> list[str]:
    """'page: target (why)' for each relative link or #anchor of a page that does not resolve."""
    bad = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.relative_to(REPO)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md":
            if anchor not in anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    return bad


def test_every_relative_link_and_anchor_resolves():
    bad = [line for page in _pages() for line in broken_links(page)]
    assert not bad, "\n".join(bad)


def test_the_link_check_can_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "a.md").write_text("# Title: `x`, y\n\n## Title: x, y\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#title-x-y-1) [ok](#here) [gone](c.md) [bad](a.md#nope) `[code](c.md)`\n"
        "```\n[fenced](c.md)\n```\n# Here\n"
    )
    assert broken_links(page) == ["b.md: c.md (no such file)", "b.md: a.md#nope (no such heading)"]


def test_every_docs_page_is_linked_from_the_index():
    index = REPO / "docs" / "README.md"
    linked = {
        (index.parent / t.partition("#")[0]).resolve()
        for t in LINK.findall(_prose(index.read_text(encoding="utf-8")))
    }
    missing = [
        p.name for p in sorted((REPO / "docs").glob("*.md")) if p != index and p not in linked
    ]
    assert not missing, f"docs/README.md links no entry for: {missing}"


# ------------------------------------------------------------------------------------- sizes
def test_readme_is_a_front_page():
    size = len((REPO / "README.md").read_text(encoding="utf-8"))
    assert size <= README_MAX_CHARS, (
        f"README.md has {size} characters (at most {README_MAX_CHARS}): move details to docs/"
    )


def test_benchmark_table_rows_are_short():
    text = (REPO / "benchmarks" / "README.md").read_text(encoding="utf-8")
    long = [
        f"benchmarks/README.md:{n}: {len(line)} characters"
        for n, line in enumerate(text.splitlines(), 1)
        if line.startswith("|") and len(line) > BENCHMARK_ROW_MAX_CHARS
    ]
    assert not long, "table rows over the limit (put the detail in the notes):\n" + "\n".join(long)
