"""The two steps of E5-mistral's data recipe: brainstorm tasks, then generate examples.

Each step is a list of jobs with deterministic ids. Jobs already in the output files are skipped,
the rest run on ``concurrency`` worker threads, and their results are written by the main thread
*in job order* (a finished job waits for the ones before it; at most ``4 * concurrency`` are in
flight or waiting). So the files of a run that was killed and rerun are byte for byte those of an
uninterrupted run (given an LLM that answers the same prompt and seed the same way), and which of
two duplicates is kept never depends on timing.

Example ids: ``<category>-t<task index>-e<example index>-s<run seed>``; brainstorm rounds:
``<category>-b<round>-s<run seed>``. The seed of each (sent to the endpoint, and drawing the
placeholders) is :func:`gte_jax.synth.templates.example_seed` of the same parts.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from gte_jax.synth.client import ChatClient, EndpointRefused, RequestFailed, Stopped
from gte_jax.synth.store import REJECTED_FILE, TASKS_FILE, OutputDir, read_lines
from gte_jax.synth.templates import Category, example_seed, render, sample_placeholders
from gte_jax.synth.validate import Rejected, dedup_key, extract_example, normalise, parse_task_list
from gte_jax.textio import InputError, iter_jsonl

logger = logging.getLogger(__name__)

# E5-mistral's query format (§3.2): the task goes into the instruction, documents stay bare.
DEFAULT_INSTRUCTION_TEMPLATE = "Instruct: {task}\nQuery: "
REJECTED_FIELDS = ("id", "stage", "category", "reason")
# Jobs that may run ahead of the oldest unfinished one, per worker: one slow reply (a timeout and
# its retries) must not idle the other workers at once, and waiting results are only a few KB.
WINDOW_PER_WORKER = 16
REPLY_EXCERPT_CHARS = 500  # of a rejected reply, kept in rejected.jsonl to see what went wrong


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    category: str
    prompt: str
    seed: int
    meta: Mapping[str, Any]  # what the record keeps about where it came from


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str  # "reply" | "failed" (gave up after retries) | "not_run" (budget spent, stopped)
    content: str = ""
    detail: str = ""
    usage: Mapping[str, int] = dataclasses.field(default_factory=dict)  # the reply's tokens


@dataclasses.dataclass
class Tally:
    """What one run did, for the progress bar and the summary's ``run`` part."""

    todo: int = 0
    kept: int = 0
    rejected: int = 0
    failed: int = 0
    not_run: int = 0

    @property
    def complete(self) -> bool:
        return self.kept + self.rejected == self.todo


def _work(client: ChatClient, job: Job) -> Outcome:
    if client.stop.is_set():
        return Outcome("not_run")
    try:
        content, usage = client.complete(job.prompt, seed=job.seed)
    except Stopped as e:
        return Outcome("not_run", detail=str(e))
    except RequestFailed as e:
        return Outcome("failed", detail=str(e))
    except EndpointRefused:
        client.stop.set()
        raise
    return Outcome("reply", content, usage=usage)


def run_in_order(
    jobs: Iterable[Job],
    work: Callable[[Job], Outcome],
    handle: Callable[[Job, Outcome], None],
    *,
    concurrency: int,
    stop: threading.Event,
) -> None:
    """``handle(job, work(job))`` for every job, ``work`` on ``concurrency`` threads, ``handle``
    here, in the order of ``jobs`` (at most ``WINDOW_PER_WORKER * concurrency`` jobs started and
    not yet handled). After ``stop`` is set no new job starts; the started ones
    finish and are handled."""
    window = WINDOW_PER_WORKER * concurrency
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="synth") as pool:
        try:
            for job in jobs:
                if stop.is_set():
                    break
                while pending and (len(pending) >= window or pending[0][1].done()):
                    done_job, future = pending.popleft()
                    handle(done_job, future.result())
                pending.append((job, pool.submit(work, job)))
            while pending:
                done_job, future = pending.popleft()
                handle(done_job, future.result())
        except BaseException:
            stop.set()
            for _, future in pending:
                future.cancel()
            raise


class _Progress:
    """A tqdm bar over the run's jobs: examples/s, and kept / rejected / failed / retries."""

    def __init__(self, tally: Tally, client: ChatClient, enabled: bool, unit: str):
        self.tally, self.client = tally, client
        self.bar = tqdm(total=tally.todo, unit=unit, disable=not enabled, smoothing=0.05)

    def count(self, kind: str) -> None:
        setattr(self.tally, kind, getattr(self.tally, kind) + 1)
        stats = self.client.stats
        self.bar.set_postfix(
            kept=self.tally.kept,
            rejected=self.tally.rejected,
            failed=self.tally.failed,
            retries=stats.retries,
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _done_ids(out: OutputDir, names: Iterable[str], stage: str) -> set[str]:
    done = {r["id"] for name in names for r in read_lines(out.root / name)}
    rejected = read_lines(out.root / REJECTED_FILE, REJECTED_FIELDS)
    done |= {r["id"] for r in rejected if r["stage"] == stage}
    return done


def _reject(out: OutputDir, job: Job, stage: str, e: Rejected, reply: Outcome) -> None:
    out.appender(REJECTED_FILE).write(
        {
            "id": job.id,
            "stage": stage,
            "category": job.category,
            "reason": e.reason,
            "detail": e.detail,
            "reply": reply.content[:REPLY_EXCERPT_CHARS],
            "usage": dict(reply.usage),
        }
    )


def _drive(
    client: ChatClient,
    jobs: Iterable[Job],
    handle_reply: Callable[[Job, Outcome], str],
    tally: Tally,
    *,
    progress: bool,
    concurrency: int,
    unit: str,
) -> None:
    """Runs the jobs, counting each outcome; ``handle_reply(job, reply)`` returns "kept" or
    "rejected" after writing the job's line."""
    bar = _Progress(tally, client, progress, unit)

    def handle(job: Job, outcome: Outcome) -> None:
        if outcome.kind == "reply":
            bar.count(handle_reply(job, outcome))
            return
        if outcome.kind == "failed":
            logger.warning("%s: %s (left to do: a rerun retries it)", job.id, outcome.detail)
        bar.count(outcome.kind)

    try:
        run_in_order(
            jobs, lambda job: _work(client, job), handle, concurrency=concurrency, stop=client.stop
        )
    finally:
        bar.close()
    tally.not_run = tally.todo - tally.kept - tally.rejected - tally.failed


def brainstorm(
    client: ChatClient,
    out: OutputDir,
    categories: Mapping[str, Category],
    *,
    rounds: int,
    seed: int,
    concurrency: int,
    progress: bool = True,
) -> Tally:
    """``rounds`` brainstorm requests per category; each round's tasks become a line of
    ``tasks.jsonl``."""
    done = _done_ids(out, [TASKS_FILE], "brainstorm")
    jobs = []
    for name, category in categories.items():
        for r in range(rounds):
            job_id = f"{name}-b{r:04d}-s{seed}"
            if job_id not in done:
                s = example_seed(seed, name, "brainstorm", r)
                jobs.append(Job(job_id, name, category.brainstorm, s, {"round": r}))

    def handle_reply(job: Job, reply: Outcome) -> str:
        try:
            tasks = parse_task_list(reply.content)
        except Rejected as e:
            _reject(out, job, "brainstorm", e, reply)
            return "rejected"
        record = {"id": job.id, "category": job.category, **job.meta, "seed": job.seed}
        out.appender(TASKS_FILE).write({**record, "tasks": tasks, "usage": dict(reply.usage)})
        return "kept"

    tally = Tally(todo=len(jobs))
    _drive(
        client, jobs, handle_reply, tally, progress=progress, concurrency=concurrency, unit="round"
    )
    return tally


def task_pools(out: OutputDir, categories: Mapping[str, Category]) -> dict[str, list[str]]:
    """Each category's tasks: its fixed ones, or those of ``tasks.jsonl`` in file order with
    duplicates (after normalisation) dropped. Lines may also be written by hand:
    ``{"category": ..., "tasks": [...]}``."""
    pools: dict[str, list[str]] = {n: list(c.tasks) for n, c in categories.items()}
    seen: dict[str, set[str]] = {n: set() for n in categories}
    path = out.root / TASKS_FILE
    for loc, record in iter_jsonl(path) if path.exists() else ():
        name, tasks = record.get("category"), record.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise InputError(f'{loc}: "tasks" must be a list of strings.')
        if name not in pools or categories[name].tasks:
            continue  # another category, or one whose tasks are fixed
        for task in tasks:
            if normalise(task) and normalise(task) not in seen[name]:
                seen[name].add(normalise(task))
                pools[name].append(" ".join(task.split()))
    return pools


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    seed: int = 0
    examples_per_task: int = 1
    fixed_task_examples: int = 1  # per fixed task (STS, bitext), which have one task each
    languages: Sequence[tuple[str, float]] = (("English", 1.0),)
    max_chars: int = 8000
    instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE


def _example_ids(
    categories: Mapping[str, Category], pools: Mapping[str, Sequence[str]], s: GenerateSettings
) -> Iterator[tuple[str, int, int, str]]:
    """(category, task index, example index, id) of every example, in job order."""
    for name, category in categories.items():
        per_task = s.fixed_task_examples if category.tasks else s.examples_per_task
        for t in range(len(pools[name])):
            for e in range(per_task):
                yield name, t, e, f"{name}-t{t:05d}-e{e:04d}-s{s.seed}"


def _generate_jobs(categories, pools, s: GenerateSettings, done: set[str]) -> Iterator[Job]:
    for name, t, e, job_id in _example_ids(categories, pools, s):
        if job_id in done:
            continue
        category, task = categories[name], pools[name][t]
        seed = example_seed(s.seed, name, t, e)
        values = sample_placeholders(category, seed, s.languages)
        meta = {"task": task, "task_index": t, "example_index": e, "placeholders": values}
        yield Job(job_id, name, render(category.generate, {**values, "task": task}), seed, meta)


def generate(
    client: ChatClient,
    out: OutputDir,
    categories: Mapping[str, Category],
    settings: GenerateSettings,
    *,
    concurrency: int,
    progress: bool = True,
) -> Tally:
    """One example per (category, task, example index) not yet in ``out``; kept ones go to
    ``<category>.jsonl``, the others to ``rejected.jsonl`` with their reason."""
    pools = task_pools(out, categories)
    names = [out.category_path(n).name for n in categories]
    done = _done_ids(out, names, "generate")
    seen = {
        dedup_key(r["query"], r["positive"])
        for n in names
        for r in read_lines(out.root / n, ("id", "query", "positive"))
    }

    def handle_reply(job: Job, reply: Outcome) -> str:
        category = categories[job.category]
        try:
            texts = extract_example(
                category, reply.content, job.meta["placeholders"], max_chars=settings.max_chars
            )
            key = dedup_key(texts["query"], texts["positive"])
            if key in seen:
                raise Rejected("duplicate", "an earlier example has the same normalised texts")
        except Rejected as e:
            _reject(out, job, "generate", e, reply)
            return "rejected"
        seen.add(key)
        instruction = settings.instruction_template.replace("{task}", job.meta["task"])
        record = {
            "id": job.id,
            "query": texts["query"],
            "positive": texts["positive"],
            "negatives": [texts["negative"]] if "negative" in texts else [],
            "instruction": instruction,
            "category": job.category,
            **job.meta,
            "seed": job.seed,
            "usage": dict(reply.usage),
        }
        out.appender(out.category_path(job.category).name).write(record)
        return "kept"

    todo = sum(1 for *_, i in _example_ids(categories, pools, settings) if i not in done)
    tally = Tally(todo=todo)
    jobs = _generate_jobs(categories, pools, settings, done)
    _drive(client, jobs, handle_reply, tally, progress=progress, concurrency=concurrency, unit="ex")
    return tally


def _cost(tokens: Mapping[str, int], price_per_million: tuple[float, float]) -> float:
    prompt, completion = price_per_million
    return round(
        (tokens["prompt_tokens"] * prompt + tokens["completion_tokens"] * completion) / 1e6, 6
    )


def _file_totals(out: OutputDir) -> dict[str, int]:
    """Tokens of every reply written to ``out`` (all runs; replies lost to a kill are not)."""
    totals = {"prompt_tokens": 0, "completion_tokens": 0}
    for path in sorted(out.root.glob("*.jsonl")):
        for record in read_lines(path, ()):
            usage = record.get("usage")
            for key in totals if isinstance(usage, dict) else ():
                totals[key] += int(usage.get(key) or 0)
    return totals


def summarise(
    out: OutputDir,
    categories: Iterable[str],
    tally: Tally,
    client: ChatClient,
    *,
    seconds: float,
    price_per_million: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Any]:
    """Kept per category, rejected per stage and reason, and token totals, counted from the files
    (the whole directory, every run); and the figures of this run (``run``)."""
    kept = {n: sum(1 for _ in read_lines(out.category_path(n))) for n in categories}
    rejected: dict[str, dict[str, int]] = {}
    by_category: dict[str, dict[str, int]] = {}
    for r in read_lines(out.root / REJECTED_FILE, REJECTED_FIELDS):
        stage = rejected.setdefault(r["stage"], {})
        stage[r["reason"]] = stage.get(r["reason"], 0) + 1
        if r["stage"] == "generate":
            cat = by_category.setdefault(r["category"], {})
            cat[r["reason"]] = cat.get(r["reason"], 0) + 1
    totals = _file_totals(out)
    stats = client.stats.as_dict()
    run = {
        **dataclasses.asdict(tally),
        **stats,
        "complete": tally.complete,
        "torn_lines_repaired": out.torn_lines_repaired,
        "seconds": round(seconds, 3),
        "per_second": round((tally.kept + tally.rejected) / max(seconds, 1e-9), 3),
        "cost_usd": _cost(stats, price_per_million),
    }
    return {
        "kept": kept,
        "rejected": rejected,
        "rejected_by_category": by_category,
        "totals": {**totals, "cost_usd": _cost(totals, price_per_million)},
        "run": run,
    }
