"""`gte-jax train`: run a config's stage(s) (``gte_jax.training``); exit 1 when the loss diverged, 2
for a config or input that cannot work, 3 when a stage stopped early (SIGTERM: a checkpoint was
saved), 130 on Ctrl-C (SIGINT: a checkpoint was saved at the next step, unless training had not
started)."""

from __future__ import annotations

import argparse
import json
import sys

from gte_jax.commands.common import USER_ERRORS, error, setup_logging
from gte_jax.training.checks import TrainingDiverged, TrainingError
from gte_jax.training.loop import run
from gte_jax.training.spec import stage_specs
from gte_jax.training.summary import json_safe

_PRINTED = (
    "stage",
    "steps",
    "examples",
    "train_seconds",
    "examples_per_second",
    "final_loss",
    "smoothed_loss",
    "loss_above_floor",
    "final_accuracy",
    "skipped_records",
)


def eval_change(summary: dict) -> dict[str, str]:
    """Each eval metric as "before -> after" (``eval_at_start`` -> ``eval``; the after value alone
    when the stage did not evaluate at step 0), for the printed line: the numbers summary.json
    keeps, where a reader of the console looks."""
    before, after = summary.get("eval_at_start") or {}, summary.get("eval") or {}
    change = {}
    for name, value in after.items():
        if name == "step" or not isinstance(value, (int, float)):
            continue
        start = before.get(name)
        change[name] = f"{value:.4f}" if start is None else f"{start:.4f} -> {value:.4f}"
    return change


def main(argv: list[str] | None = None) -> int:
    from gte_jax import sharding as shd
    from gte_jax.config import ConfigError, load_config

    parser = argparse.ArgumentParser(
        prog="gte-jax train",
        description="Train a bi-encoder with a config (any stage, or all stages of a multi-stage "
        "config). Rerunning with the same --workdir resumes from its newest checkpoint; a stage "
        "that already finished is not run again.",
        epilog="Config overrides: --config.a.b=value (e.g. --config.train.learning_rate=1e-5).",
    )
    parser.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
    parser.add_argument("--workdir", required=True, help="run directory (local path or gs://)")
    # JAX's own spelling (underscores) and the dashed one of the other commands both work.
    parser.add_argument(
        "--coordinator_address",
        "--coordinator-address",
        default=None,
        help="host:port of process 0 (multi-process; also JAX_COORDINATOR_ADDRESS)",
    )
    parser.add_argument("--num_processes", "--num-processes", type=int, default=None)
    parser.add_argument("--process_id", "--process-id", type=int, default=None)
    parser.add_argument("--log_level", "--log-level", default="INFO")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(
            f"unrecognised arguments: {' '.join(bad)} (overrides look like --config.a.b=v)"
        )
    setup_logging(args.log_level)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        return error("gte-jax train", e)
    try:
        shd.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:  # incomplete or inconsistent multi-process settings
        return error("gte-jax train", e)
    try:  # every stage's settings, parsed and checked once (after the distributed start:
        # checking model.dtype=auto asks JAX for its backend)
        specs = stage_specs(config)
    except ConfigError as e:
        return error("gte-jax train", e)
    try:
        summaries = run(specs, args.workdir)
    except KeyboardInterrupt:  # Ctrl-C before the loop (or a second one): nothing half-done
        print(
            "gte-jax train: interrupted (Ctrl-C) before a checkpoint of this start; rerun the "
            "same command to resume from the newest checkpoint, if any",
            file=sys.stderr,
        )
        return 130
    except TrainingDiverged as e:  # the run itself failed: exit 1
        error("gte-jax train", e)
        return 1
    except (TrainingError, *USER_ERRORS) as e:  # bad config/input
        return error("gte-jax train", e)
    except OSError as e:  # a read-only, full or unreachable workdir: one line, exit 2
        from gte_jax.storage import os_error_line

        return error("gte-jax train", os_error_line(e))
    return _report(summaries)


def _report(summaries: list[dict]) -> int:
    """One JSON line per stage; the exit code (0 done, 3 stopped early, 130 Ctrl-C)."""
    for s in summaries:
        line = {k: s.get(k) for k in _PRINTED}
        if eval_change(s):
            line["eval"] = eval_change(s)
        if "timing" in s:  # compiled train-step programs and where the time went
            line["timing"] = {
                k: s["timing"][k]
                for k in ("train_step_programs", "compile_seconds", "host_seconds")
            }
        for extra in ("export", "already_complete"):
            if extra in s:
                line[extra] = s[extra]
        print(json.dumps(json_safe(line), allow_nan=False))
    stopped = [s for s in summaries if not s["completed"]]
    if stopped and stopped[-1].get("stopped_by") == "SIGINT":
        print(
            f"gte-jax train: interrupted (Ctrl-C) at step {stopped[-1]['steps']}: checkpoint "
            f"saved; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    return 0 if not stopped else 3
