"""`gte-jax plan`: will a recipe fit a TPU pod, and how long will it take (``gte_jax.plan``)."""

from __future__ import annotations

import argparse
import json
import os

import jax

from gte_jax.commands.common import USER_ERRORS, error
from gte_jax.plan import (
    CHIPS,
    KNOWN_MODELS,
    KNOWN_TOPOLOGIES,
    PlanError,
    _name_order,
    parse_topology,
    plan,
    stage_configs,
)
from gte_jax.training.spec import StageSpec


def _parser() -> argparse.ArgumentParser:
    known = ", ".join(sorted(KNOWN_TOPOLOGIES, key=_name_order))
    parser = argparse.ArgumentParser(
        prog="gte-jax plan",
        description="Compile a config's train step for a TPU topology on this machine (no TPU, "
        'no weights read; needs libtpu: pip install -e ".[plan]") and print one JSON line per '
        "stage: per-chip memory against the chip's HBM, fits or not (and what to change), model "
        "FLOPs per step, step time, examples/s and days at an assumed MFU.",
        epilog="Config overrides: --config.a.b=value (e.g. "
        "--config.train.gradcache_chunk_size=512). "
        f"Topologies: GENERATION:SHAPE ({', '.join(CHIPS)}; e.g. v5e:8x8, v5p:2x2x2, v4:2x2x1) "
        f"or a Cloud TPU name: {known}.",
    )
    parser.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
    parser.add_argument("--topology", required=True, help="e.g. v5e:8x8, v4:2x2x4, v5litepod-64")
    parser.add_argument(
        "--model-config",
        "--model_config",
        dest="model_config",
        default=None,
        help=f"the model's shape when model.init_from is not a local directory: one of "
        f"{', '.join(KNOWN_MODELS)}, or a config.json / model directory",
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the time estimate")
    parser.add_argument("--stage", default=None, help="one stage of a multi-stage config")
    parser.add_argument(
        "--layers",
        default="",
        help="e.g. 1,2: compile the step at these depths and extrapolate the memory linearly to "
        "the model's depth (a 7B model's unrolled compile needs more host memory than a laptop; "
        "with --config.model.scan_layers=true the full depth compiles as one scanned layer)",
    )
    parser.add_argument(
        "--no-compile",
        "--no_compile",
        dest="compile",
        action="store_false",
        help="only train's start-up checks for every host of the topology (the mesh, each host's "
        "rows of the batch, the config's settings) and the analytic figures: seconds, no compile",
    )
    parser.add_argument(
        "--num-slices",
        "--num_slices",
        dest="num_slices",
        type=int,
        default=None,
        help="multislice: this many slices of --topology joined by DCN (default: mesh.slices); "
        "the report adds the DCN bytes per step",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from gte_jax.config import load_config

    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(
            f"unrecognised arguments: {' '.join(bad)} (overrides look like --config.a.b=v)"
        )
    if "JAX_PLATFORMS" not in os.environ:
        # Nothing runs here: the CPU backend is enough (and a TPU backend is not probed).
        jax.config.update("jax_platforms", "cpu")
    try:
        topology = parse_topology(args.topology)
        try:
            layers = [int(n) for n in args.layers.split(",") if n.strip()]
        except ValueError:
            raise PlanError(f"--layers {args.layers!r}: give depths such as 1,2") from None
        config = load_config(args.config, overrides)
        stages = config if "stages" in config else None
        # Each planned stage's settings parsed and checked once, before anything compiles.
        specs = [StageSpec.from_config(c) for c in stage_configs(config, args.stage)]
        for spec in specs:
            report = plan(
                spec,
                topology,
                model_config=args.model_config,
                mfu=args.mfu,
                stages=stages,
                layers=layers or None,
                compile=args.compile,
                num_slices=args.num_slices,
            )
            print(json.dumps(report, allow_nan=False), flush=True)
    except (PlanError, *USER_ERRORS) as e:
        return error("gte-jax plan", e)
    return 0
