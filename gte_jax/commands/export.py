"""`gte-jax export`: a training workdir's checkpoint -> a Hugging Face / sentence-transformers dir."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gte-jax export",
        description="Write model.safetensors, config.json, tokenizer and sentence-transformers files "
        "for a checkpoint of a training workdir. The result loads with "
        "transformers.AutoModel.from_pretrained and sentence_transformers.SentenceTransformer.",
    )
    parser.add_argument("--workdir", required=True, help="a gte-jax training workdir (one stage)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--model-name", default=None, help="name for the model card")
    parser.add_argument(
        "--dim",
        type=int,
        default=None,
        help="write sentence-transformers' truncate_dim: the export's embeddings are their first "
        "DIM coordinates (a Matryoshka model's prefix), in SentenceTransformer and gte-jax alike",
    )
    parser.add_argument(
        "--interpolate",
        default=None,
        metavar="MODEL=W",
        help="write (1 - W) x this checkpoint's weights + W x MODEL's (WiSE-FT / LM-Cocktail): "
        "MODEL is a stage name (a sibling workdir, e.g. pretrain=0.3), a model directory or a "
        "workdir, of the same family and shapes; LoRA runs are merged first",
    )
    args = parser.parse_args(argv)
    from gte_jax.commands.common import setup_logging

    setup_logging("WARNING")

    from etils import epath

    from gte_jax import interpolate
    from gte_jax.commands.common import USER_ERRORS, error
    from gte_jax.workdir import export_workdir

    workdir = epath.Path(args.workdir)
    card = {}
    summary = workdir / "summary.json"
    if summary.exists():  # a finished run: put its stage and metrics on the card
        s = json.loads(summary.read_text())
        card["stages"] = [{"name": s.get("stage"), "steps": s.get("steps")}]
        card["data_sources"] = sorted(s.get("sources", {}))
        card["metrics"] = {k: v for k, v in (s.get("eval") or {}).items() if k != "step"}
    if args.model_name:
        card["model_name"] = args.model_name
    try:
        mix = interpolate.parse(args.interpolate) if args.interpolate is not None else None
        out, step = export_workdir(
            workdir, args.output, step=args.step, card=card, truncate_dim=args.dim,
            interpolate=mix, shardings_of=_split_over_devices(),
        )  # fmt: skip
    except USER_ERRORS as e:
        return error("gte-jax export", e)
    except OSError as e:  # a read-only or full output directory: one line, exit 2
        from gte_jax.storage import os_error_line

        return error("gte-jax export", os_error_line(e))
    line = {"output": str(out), "workdir": str(workdir), "step": step}
    if mix is not None:
        line["interpolate"] = {"model": mix.partner, "weight": mix.weight}
    print(json.dumps(line))
    return 0


def _split_over_devices():
    """With several devices (a TPU VM's chips), the model is loaded split over them (FSDP over
    every device, ``base_model/`` read slice by slice) and written tensor by tensor, as the end of
    a training stage does: a 7B float32 model (28 GB) fits no one chip. One device: None (the
    model on it, as before)."""
    import jax

    if jax.device_count() == 1:
        return None
    from gte_jax import sharded_io, sharding

    mesh = sharding.make_mesh()
    return lambda abstract: sharded_io.param_shardings(abstract, mesh, "fsdp")


if __name__ == "__main__":
    sys.exit(main())
