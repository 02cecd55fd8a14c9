"""`gte-jax synth` end to end over real HTTP, against a scripted LLM.

The LLM is the only stub: :class:`ScriptedLLM` is a real HTTP server on 127.0.0.1 (``http.server``
in a thread) that speaks the chat-completions protocol and answers with scripted replies, chosen
as a function of the request's prompt and seed (and, for the failure scripts, of how often that
request was tried), so two runs get the same replies. The client, retries, validation, output
files and resume are the real code, run through ``gte-jax synth`` (in process, and as a
subprocess for the SIGKILL test).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from gte_jax.cli import main as cli_main
from gte_jax.data.sources import from_files
from gte_jax.synth import store, validate
from gte_jax.synth.templates import (
    PLACEHOLDER,
    RESOURCES,
    example_seed,
    load_categories,
    render,
    sample_placeholders,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
TASK_LINE = re.compile(r"^You have been assigned a [\w ]+ task: (.*)$", re.MULTILINE)
KEY = "sk-test-" + hashlib.sha256(str(os.getpid()).encode()).hexdigest()[:20]


def _prompt_kind(prompt: str) -> str:
    """Which template a prompt came from: the brainstorm file it equals, or "generate"."""
    for path in sorted((RESOURCES / "brainstorm").glob("*.txt")):
        if prompt == path.read_text():
            return f"brainstorm:{path.stem}"
    return "generate"


def _example(task: str, tag: str, **override) -> str:
    record = {
        "user_query": f"which {task} fits case {tag}",
        "positive_document": f"The document that answers {tag} for {task} in plain words.",
        "hard_negative_document": f"A document near {tag} that does not quite answer it.",
        "input": f"short input {tag}",
        "S1": f"A first sentence {tag}.",
        "S2": f"A close paraphrase {tag}.",
        "S3": f"A loosely related line {tag}.",
    }
    record.update(override)
    return json.dumps({k: v for k, v in record.items() if v is not None})


class ScriptedLLM:
    """A chat-completions server; ``script(prompt, seed, attempt) -> (status, content, sleep)``.

    Counts requests in flight (``max_in_flight``), attempts per (prompt, seed), and keeps every
    Authorization header it was sent."""

    def __init__(self, script, delay: float = 0.0):
        self.script, self.delay = script, delay
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.requests = 0
        self.attempts: dict[tuple[str, int], int] = {}
        self.auth: set[str] = set()
        self.prompts: dict[int, str] = {}  # seed -> prompt
        llm = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt, seed = body["messages"][0]["content"], body.get("seed")
                with llm.lock:
                    llm.in_flight += 1
                    llm.max_in_flight = max(llm.max_in_flight, llm.in_flight)
                    llm.requests += 1
                    attempt = llm.attempts.get((prompt, seed), 0)
                    llm.attempts[(prompt, seed)] = attempt + 1
                    llm.auth.add(self.headers.get("Authorization", ""))
                    llm.prompts[seed] = prompt
                try:
                    status, content, sleep = llm.script(prompt, seed, attempt)
                    time.sleep(sleep + llm.delay)
                finally:
                    # Out of flight before the reply is written: once the client has the reply
                    # it may send its next request, which must not count this one as well.
                    with llm.lock:
                        llm.in_flight -= 1
                self._reply(status, content, prompt)

            def _reply(self, status, content, prompt):
                if status == 200:
                    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": 7}
                    message = {"role": "assistant", "content": content}
                    payload = {"choices": [{"index": 0, "message": message}], "usage": usage}
                else:
                    payload = {"error": {"message": content or f"scripted {status}"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # the client hung up on a slow reply
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# short_long tasks, each scripted to one behaviour of a real LLM or endpoint.
TASKS = [
    "T-valid", "T-fence", "T-notjson", "T-missing", "T-empty", "T-echo", "T-long",
    "T-lang", "T-dup", "T-dup-again", "T-429", "T-500", "T-slow",
]  # fmt: skip


def mixed_script(prompt: str, seed: int, attempt: int):
    kind = _prompt_kind(prompt)
    if kind == "brainstorm:short_long":
        return 200, json.dumps(TASKS + ["t-VALID."]), 0.0  # the last: a near-duplicate task
    if kind == "brainstorm:short_short":
        return 200, "```python\n['S-pairs']\n```", 0.0  # a Python list in a fence
    if kind == "brainstorm:long_short":
        return 200, "Here are some tasks: classify news.", 0.0
    match = TASK_LINE.search(prompt)
    task = match.group(1) if match else "sts"
    tag = f"{task} #{seed}"
    replies = {
        "T-fence": "```json\n" + _example(task, tag) + "\n```",
        "T-notjson": "Sure! Here is an example: user_query = ...",
        "T-missing": _example(task, tag, hard_negative_document=None),
        "T-empty": _example(task, tag, positive_document="   "),
        "T-echo": _example(
            task, tag, user_query="Same TEXT here", positive_document="same text, here!"
        ),
        "T-long": _example(task, tag, positive_document="word " * 200),
        "T-lang": _example(task, tag, positive_document="Это документ на русском языке."),
        "T-dup": _example(task, tag, user_query="Duplicate query", positive_document="An answer."),
        "T-dup-again": _example(
            task, tag, user_query="duplicate QUERY!", positive_document="an ANSWER"
        ),
    }
    if task == "T-429" and attempt == 0:
        return 429, "", 0.0
    if task == "T-500" and attempt < 2:
        return 500, "", 0.0
    if task == "T-slow" and attempt == 0:
        return 200, _example(task, tag), 4.0  # past the client's timeout
    return 200, replies.get(task, _example(task, tag)), 0.0


def run_cli(*argv: str) -> int:
    return cli_main(["synth", *argv])


def common(url: str, out: pathlib.Path, *extra: str) -> list[str]:
    return [
        "--endpoint", url, "--model", "scripted", "--out", str(out), "--no-progress",
        "--api-key-env", "SYNTH_TEST_KEY", "--retry-base", "0.01", "--timeout", "3", *extra,
    ]  # fmt: skip


def lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_counts_per_reason_are_exact_and_the_key_is_never_written(tmp_path, monkeypatch, capsys):
    """Brainstorm then generate against every scripted behaviour; every count is exact, the
    output reads as training data, and the API key reaches the server but no file or log."""
    monkeypatch.setenv("SYNTH_TEST_KEY", KEY)
    out = tmp_path / "synth"
    with ScriptedLLM(mixed_script) as llm:
        cats = "short_long,short_short,long_short"
        rc = run_cli("brainstorm", *common(llm.url, out, "--categories", cats, "--rounds", "2"))
        brainstorm_out = capsys.readouterr()
        assert rc == 0
        requests_before = llm.requests
        rc = run_cli(
            "generate",
            *common(llm.url, out, "--categories", "short_long,short_short,sts"),
            *("--examples-per-task", "2", "--fixed-task-examples", "3", "--max-chars", "500"),
            "--concurrency", "4", "--price-completion", "2",
        )  # fmt: skip
        generate_out = capsys.readouterr()
        assert rc == 0, generate_out.err
        generate_requests = llm.requests - requests_before
    assert llm.auth == {f"Bearer {KEY}"}
    summary = json.loads(generate_out.out)
    assert summary == json.loads((out / "summary.json").read_text())
    # The near-duplicate brainstormed task is dropped; long_short's replies are not lists.
    assert summary["tasks"] == {"short_long": 13, "short_short": 1, "sts": 1}
    assert summary["kept"] == {"short_long": 11, "short_short": 2, "sts": 3}
    assert summary["rejected"] == {
        "brainstorm": {"not_list": 2},
        "generate": {
            "not_json": 2, "missing_field": 2, "empty_field": 2, "query_is_positive": 2,
            "too_long": 2, "wrong_language": 2, "duplicate": 3,
        },
    }  # fmt: skip
    run = summary["run"]
    assert (run["http_429"], run["http_5xx"], run["timeouts"], run["retries"]) == (2, 4, 2, 8)
    assert run["requests"] == generate_requests == 13 * 2 + 2 + 3 + 8
    assert run["complete"] and run["failed_requests"] == 0 and run["todo"] == 31
    assert run["prompt_tokens"] > 0 and run["completion_tokens"] == 7 * 31
    assert run["cost_usd"] == round(2 * 7 * 31 / 1e6, 6)
    # Totals count every reply written to the directory: brainstorm's 6 included.
    assert summary["totals"]["completion_tokens"] == 7 * (31 + 6)
    # Each kept example names its task, seed and placeholders: they rebuild the prompt it had.
    categories = load_categories(["short_long", "short_short", "sts"])
    for name in ("short_long", "short_short", "sts"):
        for record in lines(out / f"{name}.jsonl"):
            assert record["instruction"] == f"Instruct: {record['task']}\nQuery: "
            values = {**record["placeholders"], "task": record["task"]}
            assert render(categories[name].generate, values) == llm.prompts[record["seed"]]
            assert record["seed"] == example_seed(
                0, name, record["task_index"], record["example_index"]
            )
    # The training reader takes every kept line, instruction and negatives included.
    source = from_files("short_long", str(out / "short_long.jsonl"))
    assert len(source) == 11 and source.stats()["skipped"] == 0
    assert source[0].instruction.startswith("Instruct: ") and len(source[0].negatives) == 1
    assert from_files("ss", str(out / "short_short.jsonl"))[0].negatives == ()
    for path in out.rglob("*"):
        assert KEY.encode() not in path.read_bytes(), path
    for text in (brainstorm_out.out, brainstorm_out.err, generate_out.out, generate_out.err):
        assert KEY not in text


def deterministic_script(prompt: str, seed: int, attempt: int):
    """Replies (and their delays) that depend on the prompt and seed only: valid, invalid and
    duplicate ones."""
    if _prompt_kind(prompt) == "brainstorm:short_long":
        return 200, json.dumps([f"task {i}" for i in range(6)]), 0.0
    match = TASK_LINE.search(prompt)
    task = match.group(1) if match else "sts"
    h = int(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest(), 16) % 10
    sleep = 0.015 * (h % 4)  # replies come back out of order
    if h == 0:
        return 200, "not json at all", sleep
    if h in (1, 2):
        return 200, _example(task, "shared", user_query="the same query"), sleep
    return 200, _example(task, f"{task} {h} {seed}"), sleep


def _generate_argv(url: str, out: pathlib.Path, *extra: str) -> list[str]:
    return [
        "generate",
        *common(url, out, "--categories", "short_long,sts", "--concurrency", "3"),
        *("--examples-per-task", "5", "--fixed-task-examples", "40", *extra),
    ]


def _start_until(argv: list[str], out: pathlib.Path, lines_at_least: int) -> subprocess.Popen:
    """`gte-jax synth ...` as a subprocess, returned once ``out``'s JSONL files hold at least
    ``lines_at_least`` complete lines (a torn last line has no newline: it does not count)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gte_jax.cli", "synth", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while _written(out) < lines_at_least and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc


def _written(out: pathlib.Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in out.glob("*.jsonl"))


def test_sigkill_then_rerun_writes_exactly_the_uninterrupted_files(tmp_path, monkeypatch):
    """A generate run killed with SIGKILL mid-run, a torn last line (as a kill mid-write leaves),
    a second run stopped by SIGTERM (exit 3), then a rerun: the files end byte-identical to an
    uninterrupted run's."""
    monkeypatch.setenv("SYNTH_TEST_KEY", KEY)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    total = 5 * 6 + 40  # short_long: 6 tasks x 5, sts: 40; + 1 line of tasks.jsonl below
    with ScriptedLLM(deterministic_script, delay=0.02) as llm:
        for out in (reference, killed):
            assert run_cli("brainstorm", *common(llm.url, out, "--categories", "short_long")) == 0
        assert run_cli(*_generate_argv(llm.url, reference)) == 0
        proc = _start_until(_generate_argv(llm.url, killed), killed, 1 + 12)
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
        done_before = _written(killed) - 1
        assert 12 <= done_before < total and KEY.encode() not in err
        with (killed / "sts.jsonl").open("ab") as f:  # a line cut short by the kill
            f.write(b'{"id": "sts-t00000-e0039-s0", "query": "cut sh')
        proc = _start_until(_generate_argv(llm.url, killed), killed, 1 + done_before + 8)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate()
        assert proc.returncode == 3, err.decode()[-2000:]
        assert b"SIGTERM: finishing the requests in flight" in err and KEY.encode() not in err
        stopped = json.loads((killed / "summary.json").read_text())["run"]
        assert stopped["torn_lines_repaired"] == 1 and stopped["todo"] == total - done_before
        assert not stopped["complete"] and stopped["not_run"] > 0
        assert run_cli(*_generate_argv(llm.url, killed)) == 0
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["run"]["todo"] == total - done_before - stopped["kept"] - stopped["rejected"]
    names = sorted(p.name for p in reference.glob("*.jsonl"))
    assert names == ["rejected.jsonl", "short_long.jsonl", "sts.jsonl", "tasks.jsonl"]
    assert sorted(p.name for p in killed.glob("*.jsonl")) == names
    for name in names:
        assert (killed / name).read_bytes() == (reference / name).read_bytes(), name
    ref = json.loads((reference / "summary.json").read_text())
    for part in ("kept", "rejected", "totals"):
        assert summary[part] == ref[part], part
    assert sum(ref["kept"].values()) + sum(ref["rejected"]["generate"].values()) == total
    assert ref["rejected"]["generate"]["duplicate"] > 0
    assert ref["rejected"]["generate"]["not_json"] > 0


def test_concurrency_bound_is_respected(tmp_path, monkeypatch, capsys):
    """The server counts requests in flight: never more than --concurrency, and that many. The
    progress bar shows examples/s and the counts."""
    monkeypatch.delenv("SYNTH_TEST_KEY", raising=False)
    out = tmp_path / "synth"
    with ScriptedLLM(deterministic_script, delay=0.05) as llm:
        argv = common(llm.url, out, "--categories", "sts", "--concurrency", "3")
        argv.remove("--no-progress")
        assert run_cli("generate", *argv, "--fixed-task-examples", "24") == 0
    assert llm.max_in_flight == 3
    assert llm.auth == {""}  # no key in the environment: none sent
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "24/24" in bar and "ex/s" in bar and "kept=" in bar and "failed=0" in bar, bar


def test_budget_and_failures_stop_early_with_3_and_a_rerun_finishes(tmp_path, monkeypatch, capsys):
    """--max-requests spent -> exit 3 with what was done kept; requests failing after their
    retries -> exit 3 and nothing written for them; the rerun does the rest."""
    monkeypatch.delenv("SYNTH_TEST_KEY", raising=False)
    out = tmp_path / "synth"
    down = {"on": True}

    def script(prompt, seed, attempt):
        if down["on"] and seed % 4 == 0:
            return 503, "", 0.0
        return deterministic_script(prompt, seed, attempt)

    with ScriptedLLM(script) as llm:
        argv = ["generate", *common(llm.url, out, "--categories", "sts", "--concurrency", "1")]
        argv += ["--fixed-task-examples", "12", "--max-retries", "1"]
        assert run_cli(*argv, "--max-requests", "3") == 3
        assert llm.requests == 3
        assert run_cli(*argv) == 3
        summary = json.loads(capsys.readouterr().out.splitlines()[-1])
        failed = sum(example_seed(0, "sts", 0, e) % 4 == 0 for e in range(12))
        assert failed > 0 and summary["run"]["failed_requests"] == failed
        assert (
            summary["run"]["kept"] + summary["run"]["rejected"] == summary["run"]["todo"] - failed
        )
        down["on"] = False
        assert run_cli(*argv) == 0
        ids = [r["id"] for r in lines(out / "sts.jsonl") + lines(out / "rejected.jsonl")]
        assert sorted(ids) == [f"sts-t00000-e{e:04d}-s0" for e in range(12)]
        assert run_cli(*argv, "--fixed-task-examples", "14") == 0  # asking for more extends
    ids = [r["id"] for r in lines(out / "sts.jsonl") + lines(out / "rejected.jsonl")]
    assert sorted(ids) == [f"sts-t00000-e{e:04d}-s0" for e in range(14)]


def test_refusals_exit_2(tmp_path, monkeypatch, capsys):
    """A 401 stops the run with exit 2 (no key in the message); so do changed settings in an
    existing directory, bitext with one language, generate before any brainstorm, and a broken
    line in an output file (named with file:line)."""
    monkeypatch.setenv("SYNTH_TEST_KEY", KEY)
    out = tmp_path / "synth"
    with ScriptedLLM(lambda p, s, a: (401, f"Incorrect API key provided: {KEY}", 0.0)) as llm:
        assert run_cli("generate", *common(llm.url, out, "--categories", "sts")) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and KEY not in err
    with ScriptedLLM(deterministic_script) as llm:
        assert run_cli("generate", *common(llm.url, out, "--categories", "sts", "--seed", "1")) == 2
        assert "seed: 0 -> 1" in capsys.readouterr().err
        assert run_cli("generate", *common(llm.url, out, "--categories", "bitext")) == 2
        assert "bitext needs 2 --languages" in capsys.readouterr().err
        assert run_cli("generate", *common(llm.url, out, "--categories", "long_long")) == 2
        assert "run `gte-jax synth brainstorm` first" in capsys.readouterr().err
        argv = common(llm.url, out, "--categories", "sts")
        assert run_cli("generate", *argv, "--fixed-task-examples", "3") == 0
        sts = out / "sts.jsonl"
        sts.write_text('{"query": "no id"}\n' + sts.read_text())  # a hand-edited line
        assert run_cli("generate", *argv, "--fixed-task-examples", "4") == 2
        assert f'{sts}:1: missing field "id"' in capsys.readouterr().err
        assert run_cli("generate", *common(llm.url, sts, "--categories", "sts")) == 2
        assert f"--out {sts} is a file" in capsys.readouterr().err


def test_bitext_languages_are_distinct_and_checked(tmp_path, monkeypatch):
    """Bitext draws two different languages; a reply in the wrong script is rejected."""
    monkeypatch.delenv("SYNTH_TEST_KEY", raising=False)

    def script(prompt, seed, attempt):
        src, tgt = re.search(r"one \w+ in (\w+) and two \w+s in (\w+)", prompt).groups()
        texts = {"English": "a plain sentence", "Russian": "простое предложение"}
        s3 = "other " + texts[src if seed % 2 else tgt]  # odd seeds: S3 in the wrong language
        reply = {"S1": f"{texts[src]} {seed}", "S2": f"{texts[tgt]} {seed}!", "S3": f"{s3} {seed}?"}
        return 200, json.dumps(reply), 0.0

    out = tmp_path / "synth"
    with ScriptedLLM(script) as llm:
        argv = common(llm.url, out, "--categories", "bitext", "--languages", "English,Russian")
        assert run_cli("generate", *argv, "--fixed-task-examples", "8") == 0
    kept, rejected = lines(out / "bitext.jsonl"), lines(out / "rejected.jsonl")
    assert all(r["seed"] % 2 == 0 for r in kept) and len(kept) + len(rejected) == 8
    assert {r["reason"] for r in rejected} <= {"wrong_language"} and all(
        example_seed(0, "bitext", 0, int(r["id"].split("-e")[1][:4])) % 2 for r in rejected
    )
    for r in kept:
        assert {r["placeholders"]["src_lang"], r["placeholders"]["tgt_lang"]} == {
            "English",
            "Russian",
        }


def test_every_template_renders_and_placeholders_follow_the_seed():
    categories = load_categories()
    assert set(categories) == {
        "short_long",
        "long_short",
        "short_short",
        "long_long",
        "sts",
        "bitext",
    }
    languages = [("English", 1.0), ("German", 1.0)]
    for name, category in categories.items():
        values = sample_placeholders(category, 7, languages)
        assert values == sample_placeholders(category, 7, languages)
        prompt = render(category.generate, {**values, "task": "{not a placeholder}"})
        assert not PLACEHOLDER.findall(prompt.replace("{not a placeholder}", "")), name
        for role, key in category.fields.items():
            assert f'"{key}"' in prompt, (name, role)
    draws = {
        sample_placeholders(categories["short_long"], s, languages)["query_type"] for s in range(60)
    }
    assert draws == set(categories["short_long"].placeholders["query_type"])


def test_validation_rules():
    assert validate.normalise("  Hello,\tWORLD!! ") == "hello world"
    assert validate.dedup_key("A b.", "c") == validate.dedup_key("a  B", "C!")
    assert validate.dedup_key("a b", "c") != validate.dedup_key("a b", "d")
    assert validate.in_language("Привет, мир", "Russian")
    assert not validate.in_language("hello world", "Russian")
    assert not validate.in_language("Привет, мир", "English")
    assert validate.in_language("东京 Tokyo 是日本的首都", "Chinese")
    assert validate.in_language("Bonjour", "Klingon")  # unknown script: not checked
    assert validate.parse_task_list("['a', \"b\\n c\", 3, ' ']") == ["a", "b c"]
    with pytest.raises(validate.Rejected, match="not_list"):
        validate.parse_task_list('{"a": 1}')


def test_torn_line_repair(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert store.repair_torn_line(path) == 1
    assert path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    assert store.repair_torn_line(path) == 0
    path.write_bytes(b'{"only": "torn"')
    assert store.repair_torn_line(path) == 1 and path.read_bytes() == b""
