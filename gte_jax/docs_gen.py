"""docs/configuration.md, generated from the schema: every key of a training stage with its
default (gte_jax/defaults.py, gte_jax/data/pipeline.py), its range (gte_jax/ranges.py) and the
comment written beside it, where the paper / release / ours label lives.

The keys and defaults come from the schema object itself (``stage_config()``,
``SOURCE_DEFAULTS``); only the comments are read from the two source files, matched to the
``c.<key> = ...`` assignment (or ``"<key>": ...`` entry) they sit above or beside. So a key added
to the schema appears here with no edit, and ``tools/gen_config_docs.py --check`` (run by
``tests/test_docs.py``) fails until the page is regenerated.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import tokenize
from typing import Any

from gte_jax import defaults, ranges
from gte_jax.data import pipeline

PAGE = "docs/configuration.md"
COMMAND = "python3 tools/gen_config_docs.py"
# The label a comment gives its value, by the first of these words it uses.
_LABELS = (("ours", r"\bours\b"), ("release", r"\brelease\b"), ("paper", r"§|\bpaper\b"))


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on it (without the '#')."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _comment_for(node: ast.AST, lines: list[str], comments: dict[int, str]) -> str:
    """The full-line comments right above ``node`` and the comments on its own lines."""
    above, number = [], node.lineno - 1
    while number in comments and lines[number - 1].strip().startswith("#"):
        above.insert(0, comments[number])
        number -= 1
    beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
    return " ".join(above + beside)


def _group_calls(tree: ast.Module) -> dict[str, tuple[str, str]]:
    """Function name -> (the function that calls it, the attribute it fills): ``c.model =
    _model_defaults()`` in stage_config gives {"_model_defaults": ("stage_config", "model")}."""
    calls = {}
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)
                and isinstance(node.targets[0], ast.Attribute)
            ):
                calls[node.value.func.id] = (fn.name, node.targets[0].attr)
    return calls


def _prefix(name: str, calls: dict[str, tuple[str, str]]) -> str:
    prefix = ""
    while name in calls:
        name, attr = calls[name]
        prefix = f"{attr}.{prefix}"
    return prefix


def _module_comments(module: Any, prefixes: dict[str, str]) -> dict[str, str]:
    """Dotted key -> comment for every ``c.<key> = ...`` in the module's group functions (named
    in ``prefixes``, each with the key prefix it fills), ``group:<prefix>`` -> the group's
    introduction, and ``data.sources[].<field>`` for the entries of SOURCE_DEFAULTS."""
    source = inspect.getsource(module)
    tree, lines, comments = ast.parse(source), source.splitlines(), _comments(source)
    out = {}
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in prefixes):
        prefix = prefixes[fn.name]
        for node in ast.walk(fn):
            target = node.targets[0] if isinstance(node, ast.Assign) else None
            if isinstance(target, ast.Attribute) and getattr(target.value, "id", "") == "c":
                out[prefix + target.attr] = _comment_for(node, lines, comments)
        out[f"group:{prefix}"] = _group_intro(fn, lines, comments)
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "SOURCE_DEFAULTS":
            for key in node.value.keys:
                out[f"data.sources[].{key.value}"] = _comment_for(key, lines, comments)
    return out


def _group_intro(fn: ast.FunctionDef, lines: list[str], comments: dict[int, str]) -> str:
    """A group function's docstring, or the comment above its ``c = ConfigDict()``."""
    doc = ast.get_docstring(fn)
    if doc:
        return " ".join(doc.split())
    first = next((n for n in fn.body if isinstance(n, ast.Assign)), None)
    return _comment_for(first, lines, comments) if first is not None else ""


def schema_comments() -> dict[str, str]:
    """Every schema comment, keyed as the page shows it."""
    calls = _group_calls(ast.parse(inspect.getsource(defaults)))
    prefixes = {"stage_config": ""} | {name: _prefix(name, calls) for name in calls}
    out = _module_comments(defaults, prefixes)
    data = prefixes["default_data_config"]
    out |= _module_comments(
        pipeline, {"default_data_config": data, "_replay_defaults": f"{data}replay."}
    )
    return out


def _leaves(node: Any, prefix: str = ""):
    for key in node.keys():
        value = node[key]
        if hasattr(value, "keys"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def label(comment: str) -> str:
    """paper / release / ours: the first of those a comment names ('' when none)."""
    found = [
        (m.start(), name)
        for name, rx in _LABELS
        for m in [re.search(rx, comment, re.IGNORECASE)]
        if m
    ]
    return min(found)[1] if found else ""


def _cell(text: str) -> str:
    """Table-cell Markdown: pipes escaped, and '<' outside code spans (not an HTML tag)."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


def _default(value: Any) -> str:
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _row(key: str, value: Any, comment: str) -> str:
    rule = ranges.RANGES.get(key)
    limits = _cell(rule.describe()) if rule else ""
    return (
        f"| `{key}` | {_cell(_default(value))} | {limits} | {label(comment)} | {_cell(comment)} |"
    )


def _sections() -> dict[str, list[tuple[str, Any]]]:
    """Group prefix ('' for the stage's own keys) -> [(key, default)], in schema order."""
    sections: dict[str, list[tuple[str, Any]]] = {"": []}
    for key, value in _leaves(defaults.stage_config()):
        sections.setdefault(key.rpartition(".")[0], []).append((key, value))
        if key.startswith("data.") and "data.sources[]" not in sections:
            sources = pipeline.SOURCE_DEFAULTS.items()
            sections["data.sources[]"] = [(f"data.sources[].{k}", v) for k, v in sources]
    stage_keys = {key for rows in sections.values() for key, _ in rows}
    data = pipeline.default_data_config()
    sections[_DATA_ONLY] = [
        (f"data.{k}", v) for k, v in _leaves(data) if f"data.{k}" not in stage_keys
    ]
    return sections


# Keys of a data-only config (`gte-jax data`) that a training stage does not have.
_DATA_ONLY = "data-only"


_HEADER = f"""# Configuration: every key

<!-- Generated by `{COMMAND}` from gte_jax/defaults.py, gte_jax/data/pipeline.py and
gte_jax/ranges.py: edit those, then regenerate (tests/test_docs.py fails while this page is stale). -->

Every key a training stage accepts, with its default, its valid range (a value outside it is
refused at start-up, exit 2, one line naming the key) and the comment written beside it in the
schema. **label** is where the default comes from when its comment says so: *paper* (the recipe's
paper), *release* (the authors' released code or configs), *ours* (our choice); blank where the
default is a plain code default. A recipe file (`configs/*.py`) changes only what its recipe
changes, and labels its own values the same way. How configs, overrides and multi-stage files
work: [recipes.md](recipes.md#configs-how-they-work).
"""


def _section(prefix: str, rows: list[tuple[str, Any]], comments: dict[str, str]) -> list[str]:
    out = [f"## `{prefix}`" if prefix else "## The stage's own keys", ""]
    if prefix == _DATA_ONLY:
        out = [
            "## Data-only keys (`gte-jax data`; not a stage's: its batch is `train.batch_size`)",
            "",
        ]
    intro = comments.get(f"group:{prefix}." if prefix else "group:", "")
    if prefix == "data":
        intro = (inspect.getdoc(pipeline) or "").split("\n\n", 1)[-1]  # its field list
    if intro:
        out += [intro.replace("``", "`"), ""]
    out += ["| key | default | range | label | meaning |", "|---|---|---|---|---|"]
    for key, value in rows:
        comment = comments.get(key, "")
        rule = ranges.RANGES.get(key)
        out.append(_row(key, value, comment or (rule.why if rule else "")))
    return out + [""]


def render() -> str:
    """The text of docs/configuration.md."""
    comments = schema_comments()
    lines = [_HEADER]
    for prefix, rows in _sections().items():
        lines += _section(prefix, rows, comments)
    return "\n".join(lines).rstrip("\n") + "\n"
