"""`gte-jax synth brainstorm|generate`: synthetic training data from an LLM (``gte_jax.synth``).

    gte-jax synth brainstorm --endpoint http://localhost:8000/v1 --model NAME --out DIR --rounds 5
    gte-jax synth generate   --endpoint http://localhost:8000/v1 --model NAME --out DIR \\
        --examples-per-task 4 --fixed-task-examples 200

Any OpenAI-compatible chat-completions endpoint; the API key is read from the environment variable
named by ``--api-key-env`` (default OPENAI_API_KEY; none sent when it is unset). Prints the summary
(also written to DIR/summary.json) as one JSON object on stdout. Exit codes: 0 done; 2 bad usage,
settings or input, or an endpoint that refuses (HTTP 401/403/404: wrong URL, model or key); 3
stopped early (request budget spent, SIGINT/SIGTERM, or requests that failed after their retries):
rerun the same command to continue.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

from gte_jax.commands.common import USER_ERRORS, error, positive_int, setup_logging
from gte_jax.errors import ConfigError
from gte_jax.synth import run
from gte_jax.synth.client import ChatClient, EndpointRefused
from gte_jax.synth.store import OutputDir
from gte_jax.synth.templates import load_categories, templates_digest

logger = logging.getLogger("gte_jax.synth")

BRAINSTORMED = ("short_long", "long_short", "short_short", "long_long")
# bitext needs two languages (--languages), so it is generated only when asked for.
GENERATED = (*BRAINSTORMED, "sts")


def _non_negative(kind: type, *, strict: bool = False):
    """argparse type: a number >= 0 (> 0 when ``strict``); a bad one is a usage error (exit 2)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < 0 or (strict and value == 0):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} 0, got {text}")
        return value

    return parse


def _common(p: argparse.ArgumentParser, categories: tuple[str, ...]) -> None:
    p.add_argument("--endpoint", required=True, help="base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--model", required=True, help="model name the endpoint serves")
    p.add_argument("--out", required=True, help="output directory (created; reruns continue it)")
    p.add_argument("--categories", default=",".join(categories), help="default: %(default)s")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the key")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight")
    p.add_argument(
        "--timeout", type=_non_negative(float, strict=True), default=120.0, help="seconds per try"
    )
    p.add_argument("--max-retries", type=_non_negative(int), default=5, help="on 429/5xx/timeouts")
    p.add_argument("--retry-base", type=_non_negative(float), default=1.0, help="backoff seconds")
    p.add_argument(
        "--max-requests", type=_non_negative(int), default=0, help="HTTP budget (0: none)"
    )
    p.add_argument("--temperature", type=_non_negative(float), default=1.0)
    p.add_argument("--max-tokens", type=positive_int, default=2048, help="per reply")
    p.add_argument(
        "--seed", type=_non_negative(int), default=0, help="run seed (ids, placeholders)"
    )
    p.add_argument("--price-prompt", type=_non_negative(float), default=0.0, help="$ / 1M tokens")
    p.add_argument("--price-completion", type=_non_negative(float), default=0.0, help="$ / 1M")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--log-level", default="INFO")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gte-jax synth", description=__doc__.split("\n")[0].strip("`")
    )
    sub = parser.add_subparsers(dest="step", required=True)
    b = sub.add_parser("brainstorm", help="ask the LLM for a pool of tasks per category")
    _common(b, BRAINSTORMED)
    b.add_argument("--rounds", type=positive_int, default=1, help="requests per category")
    g = sub.add_parser("generate", help="one JSON example per (task, example index)")
    _common(g, GENERATED)
    g.add_argument("--examples-per-task", type=positive_int, default=1)
    g.add_argument(
        "--fixed-task-examples",
        type=positive_int,
        default=100,
        help="examples of each category with a fixed task (sts, bitext)",
    )
    g.add_argument(
        "--languages",
        default="English",
        help="NAME[=WEIGHT],... drawn for {language} (default %(default)s)",
    )
    g.add_argument("--max-chars", type=positive_int, default=8000, help="longest text kept")
    g.add_argument(
        "--instruction-template",
        default=run.DEFAULT_INSTRUCTION_TEMPLATE,
        help='the "instruction" field written, {task} filled in (default: E5-mistral\'s)',
    )
    return parser


def parse_languages(text: str) -> list[tuple[str, float]]:
    """``"English=3,French"`` -> [("English", 3.0), ("French", 1.0)]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, weight = item.partition("=")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"--languages: bad weight in {item!r}") from None
        if value <= 0 or not name.strip():
            raise ConfigError(f"--languages: {item!r} needs a name and a weight > 0")
        out.append((name.strip(), value))
    if not out or len({n for n, _ in out}) != len(out):
        raise ConfigError(f"--languages: need distinct names, got {text!r}")
    return out


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT / SIGTERM: start no new request, finish and write the ones in flight, exit 3. A
    second one ends the process at once (the files stay resumable: see gte_jax.synth.store)."""

    def handler(signum, _frame):
        if stop.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        logger.warning("%s: finishing the requests in flight, then stopping (again: now)", name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _client(args, stop: threading.Event) -> ChatClient:
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None:
        logger.info("$%s is not set: sending no API key", args.api_key_env)
    return ChatClient(
        args.endpoint,
        args.model,
        api_key=api_key,
        timeout=args.timeout,
        max_retries=args.max_retries,
        retry_base=args.retry_base,
        max_requests=args.max_requests,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        stop=stop,
    )


def _settings(args) -> dict:
    """What a directory's data depends on: a rerun must use the same (counts may grow)."""
    common = {
        "model": args.model,
        "seed": args.seed,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "templates": templates_digest(load_categories()),
    }
    if args.step == "brainstorm":
        return common
    return {
        **common,
        "languages": [list(x) for x in parse_languages(args.languages)],
        "max_chars": args.max_chars,
        "instruction_template": args.instruction_template,
    }


def _run_step(args, client: ChatClient, out: OutputDir) -> tuple[run.Tally, dict]:
    names = [n.strip() for n in args.categories.split(",") if n.strip()]
    categories = load_categories(names)
    if args.step == "brainstorm":
        fixed = [n for n, c in categories.items() if c.tasks]
        if fixed:
            raise ConfigError(f"{fixed} have fixed tasks: nothing to brainstorm")
        out.check_settings(args.step, _settings(args))
        tally = run.brainstorm(
            client, out, categories, rounds=args.rounds, seed=args.seed,
            concurrency=args.concurrency, progress=args.progress,
        )  # fmt: skip
        return tally, {n: len(p) for n, p in run.task_pools(out, categories).items()}
    languages = parse_languages(args.languages)
    pools = run.task_pools(out, categories)
    for name, category in categories.items():
        if len(category.language_placeholders) > len(languages):
            raise ConfigError(f"{name} needs {len(category.language_placeholders)} --languages")
        if not pools[name]:
            raise ConfigError(
                f"no tasks for {name} in {out.root / 'tasks.jsonl'}: run `gte-jax synth "
                'brainstorm` first (or write lines {"category": ..., "tasks": [...]})'
            )
    out.check_settings(args.step, _settings(args))
    settings = run.GenerateSettings(
        seed=args.seed,
        examples_per_task=args.examples_per_task,
        fixed_task_examples=args.fixed_task_examples,
        languages=languages,
        max_chars=args.max_chars,
        instruction_template=args.instruction_template,
    )
    tally = run.generate(
        client, out, categories, settings, concurrency=args.concurrency, progress=args.progress
    )
    return tally, {n: len(p) for n, p in pools.items()}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prog = f"gte-jax synth {args.step}"
    stop = threading.Event()
    out = None
    try:
        setup_logging(args.log_level)
        client = _client(args, stop)
        out = OutputDir(args.out)
        start = time.perf_counter()
        with _stop_on_signals(stop):
            tally, tasks = _run_step(args, client, out)
        seconds = time.perf_counter() - start
    except (EndpointRefused, *USER_ERRORS) as e:
        return error(prog, e)
    finally:
        if out is not None:
            out.close()
    names = [n.strip() for n in args.categories.split(",") if n.strip()]
    summary = run.summarise(
        out, names if args.step == "generate" else [], tally, client, seconds=seconds,
        price_per_million=(args.price_prompt, args.price_completion),
    )  # fmt: skip
    summary["tasks"] = tasks
    path = out.write_summary(summary)
    print(json.dumps(summary))
    if not tally.complete:
        logger.warning(
            "stopped early: %d done, %d failed, %d not run; rerun the same command to continue "
            "(summary: %s)", tally.kept + tally.rejected, tally.failed, tally.not_run, path,
        )  # fmt: skip
        return 3
    return 0
