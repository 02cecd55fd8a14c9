"""The package's layering, checked: no import cycles (lazy imports inside functions included),
every module imports on its own, library modules parse no command lines, and no function grows
past what a reader can hold (docs/design.md has the map)."""

from __future__ import annotations

import ast
import io
import pathlib
import re
import subprocess
import sys
import tokenize

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gte_jax"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """gte_jax modules that ``name`` imports anywhere in its file (top level or in a function)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "gte_jax":
                found.add(target)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """Two modules that import each other inside functions are reported."""
    pkg = tmp_path / "gte_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from gte_jax import b\n")
    (pkg / "b.py").write_text("def g():\n    import gte_jax.a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "gte_jax.a -> gte_jax.b -> gte_jax.a" in str(e)
    else:
        raise AssertionError("the cycle was not found")


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in _modules() if n != "gte_jax.__main__"]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    out = subprocess.run(
        [sys.executable, "-c", code, *names],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr[-3000:]


def test_library_modules_parse_no_command_lines():
    """Argument parsing lives in gte_jax/commands/ (and data/cli.py); the training loop module
    holds the loop only."""
    offenders = []
    for name, path in _modules().items():
        if name.startswith("gte_jax.commands") or name in ("gte_jax.cli", "gte_jax.data.cli"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if "argparse" in names:
                    offenders.append(f"{name} imports argparse")
            if isinstance(node, ast.FunctionDef) and node.name == "main" and node.col_offset == 0:
                offenders.append(f"{name} defines main()")
    assert not offenders, offenders


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


# A comment that points at a tracker entry (a hash and a number, "issue" and a number, a
# bracketed tag and a hash) says nothing to a reader of the code: it should say what the code does.
ISSUE_REFERENCE = re.compile(r"(?<![\w&/])#\d+\b|\bissues?\s*#?\s*\d+\b|\[\w+\]\s*#", re.I)
COMMENT_SCAN = ("gte_jax", "configs", "data_pipelines", "launch", "tests")


def _python_comments(path: pathlib.Path):
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = node.body[0] if node.body else None
            if isinstance(doc, ast.Expr) and isinstance(getattr(doc, "value", None), ast.Constant):
                if isinstance(doc.value.value, str):
                    yield doc.lineno, doc.value.value


def _shell_comments(path: pathlib.Path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if "#" in line:
            yield number, line[line.index("#") :]


def issue_references(root: pathlib.Path) -> list[str]:
    hits = []
    for top in COMMENT_SCAN:
        for path in sorted((root / top).rglob("*")):
            if path.suffix == ".py":
                comments = _python_comments(path)
            elif path.suffix in (".sh", ".sbatch"):
                comments = _shell_comments(path)
            else:
                continue
            for number, text in comments:
                for m in ISSUE_REFERENCE.finditer(text):
                    line = number + text.count("\n", 0, m.start())
                    hits.append(f"{path.relative_to(root)}:{line}: {m.group(0)!r}")
    return hits


def test_no_comment_cites_an_issue_number():
    hits = issue_references(REPO)
    advice = "comments citing an issue (say what the code does instead):\n"
    assert not hits, advice + "\n".join(hits)


def test_the_issue_number_scan_can_fail(tmp_path):
    (tmp_path / "gte_jax").mkdir()
    (tmp_path / "launch").mkdir()
    (tmp_path / "gte_jax" / "m.py").write_text(
        '"""Fixes Issue 25."""\nx = "#24 in a string is data"  # see #24\ny = 1  # 2 of 3\n'
    )
    (tmp_path / "launch" / "run.sh").write_text("echo hi  # [pod] # 3\n")
    hits = issue_references(tmp_path)
    assert [h.split(": ", 1)[1] for h in hits] == ["'#24'", "'Issue 25'", "'[pod] #'"], hits


def test_each_objective_module_registers_one_objective():
    """A loss is one module of gte_jax/objectives/ that registers itself (docs/design.md, "Adding
    a loss"): a module with a ``register(...)`` call at top level has exactly one, and the
    registry holds exactly the objectives of those modules."""
    folder = PACKAGE / "objectives"
    registering = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem in ("__init__", "base"):
            continue
        calls = [
            node
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "register"
        ]
        if calls:
            registering[path.stem] = len(calls)
    assert registering and all(n == 1 for n in registering.values()), registering
    code = (
        "from gte_jax import objectives\n"
        "print(' '.join(sorted(type(o).__module__.rpartition('.')[2] "
        "for o in objectives.registered().values())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == sorted(registering), (out.stdout, registering)


# The training package's layout (docs/design.md, "Map of the package").
TRAINING = "gte_jax.training"
LOOP = "gte_jax.training.loop"
LOOP_IMPORTERS = ("gte_jax.commands",)  # the training package, plan and the shim do not
MAX_TRAINING_MODULE_LINES = 600


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def loop_importers(graph: dict[str, set[str]]) -> list[str]:
    """Modules outside gte_jax/commands/ that import the loop (tests and benchmarks may: they
    are not the package)."""
    inside = lambda name: any(name == p or name.startswith(p + ".") for p in LOOP_IMPORTERS)  # noqa: E731
    return sorted(name for name, deps in graph.items() if LOOP in deps and not inside(name))


def test_only_the_commands_import_the_training_loop():
    assert not loop_importers(_graph())


def test_the_loop_check_can_fail():
    graph = {
        "gte_jax.plan": {LOOP},
        "gte_jax.train": {LOOP},
        "gte_jax.training.setup": {LOOP},
        "gte_jax.commands.train": {LOOP},
        LOOP: set(),
    }
    assert loop_importers(graph) == ["gte_jax.plan", "gte_jax.train", "gte_jax.training.setup"]


# Where a stage's settings are read as typed specs (gte_jax/training/spec.py), not as an
# untyped config: no parameter named like a config is left unannotated or ``Any``.
TYPED_CONFIG_FILES = ("training/*.py", "plan.py")
_CONFIG_NAME = re.compile(r"^(config|cfg|\w+_cfg)$")


def untyped_config_parameters(paths: list[pathlib.Path]) -> list[str]:
    out = []
    for path in paths:
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
            for arg in args:
                if not _CONFIG_NAME.match(arg.arg):
                    continue
                note = ast.unparse(arg.annotation) if arg.annotation else ""
                if not note or re.search(r"\bAny\b", note):
                    out.append(f"{path.name}:{fn.lineno} {fn.name}({arg.arg}: {note or '?'})")
    return out


def test_training_and_plan_take_typed_specs():
    paths = sorted(p for pattern in TYPED_CONFIG_FILES for p in PACKAGE.glob(pattern))
    assert len(paths) > 5
    found = untyped_config_parameters(paths)
    assert not found, "annotate these with their spec (gte_jax/training/spec.py):\n" + "\n".join(
        found
    )


def test_the_typed_spec_check_can_fail(tmp_path):
    (tmp_path / "m.py").write_text(
        "from typing import Any\n\n\n"
        "def f(config: Any, n: int): ...\n\n\n"
        "def g(train_cfg, x): ...\n\n\n"
        "def h(config: StageSpec, cfg: dict[str, Any]): ...\n\n\n"
        "def k(config: StageSpec, data_cfg: DataSpec): ...\n"
    )
    assert untyped_config_parameters([tmp_path / "m.py"]) == [
        "m.py:4 f(config: Any)",
        "m.py:7 g(train_cfg: ?)",
        "m.py:10 h(cfg: dict[str, Any])",
    ]


def test_no_config_cast_in_training_or_plan():
    """A spec's fields are typed: ``int(config.train.batch_size)`` would say the parse never
    happened (the evaluator, still a config reader, aside)."""
    cast = re.compile(r"\b(int|float|bool|str)\((config|cfg|tcfg|\w+_cfg)\.")
    paths = sorted(p for pattern in TYPED_CONFIG_FILES for p in PACKAGE.glob(pattern))
    found = [
        f"{p.name}:{i}: {line.strip()}"
        for p in paths
        if p.name != "evaluator.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if cast.search(line)
    ]
    assert not found, "\n".join(found)


def test_plan_builds_the_step_without_train_or_the_loop():
    """``gte-jax plan`` compiles the step of gte_jax/training/step.py; nothing it imports, even
    indirectly, is the loop or the ``gte_jax.train`` shim."""
    reached = _reachable(_graph(), "gte_jax.plan")
    assert "gte_jax.training.step" in reached
    assert not reached & {"gte_jax.train", LOOP}, sorted(reached & {"gte_jax.train", LOOP})


def test_training_modules_are_short():
    long = {
        name: n
        for name, path in _modules().items()
        if name.startswith(TRAINING + ".")
        and (n := len(path.read_text().splitlines())) > MAX_TRAINING_MODULE_LINES
    }
    assert not long, (
        f"split these modules of gte_jax/training/ (> {MAX_TRAINING_MODULE_LINES} lines): {long}"
    )


def uncommented_local_imports(path: pathlib.Path) -> list[str]:
    """Imports inside a function with no comment on their line or the line above (why not at
    the top of the module: an optional dependency, a cycle, start-up time)."""
    lines = path.read_text().splitlines()
    out = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                if "#" not in here and not above.startswith("#"):
                    out.append(f"{path.name}:{node.lineno}: {here.strip()}")
    return out


def test_imports_inside_training_functions_say_why():
    found = [
        hit
        for path in sorted((PACKAGE / "training").glob("*.py"))
        for hit in uncommented_local_imports(path)
    ]
    assert not found, "say why each is not at the top of its module:\n" + "\n".join(found)


def test_the_local_import_check_can_fail(tmp_path):
    (tmp_path / "m.py").write_text(
        "def f():\n    import json\n\n\ndef g():\n    # optional\n    import tqdm\n"
    )
    assert uncommented_local_imports(tmp_path / "m.py") == ["m.py:2: import json"]
