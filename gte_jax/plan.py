"""`gte-jax plan`: will a recipe fit a TPU pod, and how long will it take? Answered on a laptop.

The recipe's real train step (:func:`gte_jax.training.step.build_train_step`, what ``train``
runs, with :func:`~gte_jax.training.optimizer.make_optimizer` and
:func:`~gte_jax.training.state.init_train_state`) is built on abstract values only (``nnx.eval_shape`` / ``jax.eval_shape``: no weights are read, nothing is
allocated) and compiled ahead of time for a TPU topology described by ``libtpu`` (MaxText's
``train_compile.py`` practice): ``jax.experimental.topologies.get_topology_desc`` gives the devices
of a pod that is not there, XLA's TPU compiler lays the step out on them and reports its memory per
chip. No TPU is needed, only ``pip install -e ".[plan]"`` (libtpu from PyPI).

One JSON line per stage: chips, per-chip argument / temp / peak GiB against the chip's HBM, whether
it fits, the analytic model FLOPs of one step and, at an assumed MFU, the step time, examples per
second and days for ``train.num_steps``; the GradCache chunk and the parameter sharding used. When it
does not fit, ``advice`` says what to change.

Memory per chip, from XLA's compiled buffer assignment (``memory_analysis()``): ``argument`` (the
train state and this chip's slice of the batch), ``output``, ``temp`` (XLA's temporaries) and
``peak`` (XLA's ``peak_memory_in_bytes``: the most live at once, arguments included); ``fits`` when
the peak is within the chip's HBM. When XLA itself refuses (its ``CompileTimeHbmOom``), the report
gives the arguments plus the temporaries XLA named, a lower bound. Every chip is on the mesh's
``"data"`` axis (the batch is split over all of them). Model FLOPs do not count recomputation
(remat, GradCache's second forward), so at a given MFU the chips do more work than that.

What is compiled: the padded batch at the longest lengths the config allows (``data.*_max_length``,
the largest per-source ``batch_size``, the most hard negatives a source asks for) -- the worst step
of the run. Packed batches (``data.packing``) have the same number of tokens or fewer, so the
padded figure bounds them. A source whose ``num_negatives`` is auto has its data read for K, as
training reads them (:func:`num_negatives`); where they cannot be read here, plan exits 2 naming
the setting. Each step's FLOPs add the objective's own (:meth:`gte_jax.objectives.Objective.flops`: the
similarity matrices, or MNTP's LM head on the masked positions).

The model's shape comes from ``model.init_from`` when it names a local directory with a
``config.json`` (only that file is read), or from ``--model-config``: a known name
(:data:`KNOWN_MODELS`, e.g. ``bert-base``), a ``config.json`` file or a model directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from gte_jax import objectives, plan_cost
from gte_jax import sharding as shd
from gte_jax.models import lora
from gte_jax.models.precision import compute_dtype
from gte_jax.topologies import (  # noqa: F401  (re-exported: plan is where users look)
    CHIPS,
    KNOWN_TOPOLOGIES,
    Chip,
    PlanError,
    Topology,
    _name_order,
    parse_topology,
    topology_devices,
)
from gte_jax.training import checks
from gte_jax.training.optimizer import make_optimizer
from gte_jax.training.spec import ModelSpec, StageSpec, parse
from gte_jax.training.state import abstract_train_state
from gte_jax.training.step import TrainStep, build_train_step

GIB = 1024**3

# --------------------------------------------------------------------------------------------------
# The model's shape, without its weights
# --------------------------------------------------------------------------------------------------


def _decoder_configs() -> dict[str, Any]:
    """Published decoder shapes (transformers' own config classes; no weights)."""
    from transformers import MistralConfig, Qwen2Config

    return {
        # E5-mistral-7b-instruct = Mistral-7B-v0.1's shape; MistralConfig's defaults are it.
        "mistral-7b": MistralConfig(max_position_embeddings=32768, sliding_window=4096),
        # gte-Qwen2-7B-instruct (Qwen2-7B's shape)
        "qwen2-7b": Qwen2Config(
            vocab_size=151646,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        ),
    }


def _transformers_config(name: str) -> dict[str, Any]:
    from transformers import BertConfig

    if name in ("mistral-7b", "qwen2-7b"):
        return _decoder_configs()[name].to_dict()

    base = BertConfig()  # transformers' defaults are bert-base-uncased's shape
    shapes = {
        "bert-base": base,
        "bert-large": BertConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
        ),
        # sentence-transformers/all-MiniLM-L6-v2 / L12-v2 (microsoft/MiniLM-L12-H384-uncased)
        "minilm-l6": BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        ),
        "minilm-l12": BertConfig(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536
        ),
    }
    return shapes[name].to_dict()


# --model-config names: transformers' config classes with the published shapes.
KNOWN_MODELS = ("bert-base", "bert-large", "minilm-l6", "minilm-l12", "mistral-7b", "qwen2-7b")
_MODEL_ALIASES = {
    "bert-base-uncased": "bert-base",
    "bert-large-uncased": "bert-large",
    "all-minilm-l6-v2": "minilm-l6",
    "all-minilm-l12-v2": "minilm-l12",
}


def _config_json_of(path: Any) -> dict[str, Any] | None:
    """The HF config.json of a model directory (also a sentence-transformers directory or a gte-jax
    workdir, whose ``base_model/`` holds it), a config.json file, or None."""
    from etils import epath

    from gte_jax.hf_bidirectional import plain_config

    path = epath.Path(path)
    if path.is_file():
        return plain_config(json.loads(path.read_text()))
    if not path.is_dir():
        return None
    candidates = [path, path / "base_model"]
    for folder in list(candidates):
        modules = folder / "modules.json"
        if modules.exists():  # sentence-transformers: the Transformer module's folder
            for module in json.loads(modules.read_text()):
                if str(module.get("type", "")).endswith(".Transformer"):
                    candidates.append(folder / module.get("path", ""))
    for folder in candidates:
        if (folder / "config.json").exists():
            return plain_config(json.loads((folder / "config.json").read_text()))
    return None


def model_shape(
    model_cfg: ModelSpec, model_config: str | None, stages: Mapping[str, Any] | None = None
):
    """(HF config dict, where it came from) for a stage's ``model`` group.

    ``model_config`` (``--model-config``) wins: a name of :data:`KNOWN_MODELS` or a path to a
    config.json / model directory. Otherwise ``model.init_from`` when it is a local directory (only
    its config.json is read), an earlier stage (``stage:NAME``: that stage's model) or a model a pip
    package ships (``all-MiniLM-L6-v2``)."""
    if model_config:
        key = model_config.strip().lower()
        key = _MODEL_ALIASES.get(key, key)
        if key in KNOWN_MODELS:
            return _transformers_config(key), f"--model-config {key} (transformers config class)"
        found = _config_json_of(model_config)
        if found is None:
            raise PlanError(
                f"--model-config {model_config!r} is neither a known shape ({', '.join(KNOWN_MODELS)}) "
                "nor a config.json file / model directory"
            )
        return found, f"{model_config} (config.json)"
    init = model_cfg.init_from
    seen = set()
    while init.startswith("stage:") and stages is not None:
        name = init.split(":", 1)[1]
        if name in seen or name not in stages:
            break
        seen.add(name)
        init = str(stages[name].model.init_from)
    found = None
    if init and not init.startswith("stage:"):
        found = _config_json_of(init)
        if found is None:
            from gte_jax import workdir as wd

            try:
                found = _config_json_of(wd.resolve_model_path(init))
            except FileNotFoundError:
                found = None
    if found is None:
        raise PlanError(
            f"model.init_from={init!r} is not a local model directory, so its shape is unknown "
            f"(plan reads only its config.json): pass --model-config with one of "
            f"{', '.join(KNOWN_MODELS)}, or a config.json file / model directory"
        )
    return found, f"{init} (config.json)"


def encoder_config(hf_config: Mapping[str, Any], model_cfg: ModelSpec):
    """The tower config of the stage: the architecture plus its dtype, remat and dropout."""
    from gte_jax import workdir as wd
    from gte_jax.models import registry

    try:
        return registry.config_from_hf(
            dict(hf_config),
            dtype=compute_dtype(model_cfg.dtype, "tpu"),
            attention_platform="tpu",  # model.attention_kernel "auto" decides for the TPU
            **wd.model_overrides(model_cfg),
        )
    except (TypeError, ValueError) as e:
        raise PlanError(f"model shape: {e}") from None


# --------------------------------------------------------------------------------------------------
# The step, abstractly
# --------------------------------------------------------------------------------------------------


def batch_shapes(
    config: StageSpec | ml_collections.ConfigDict,
) -> tuple[dict[str, tuple[int, ...]], int, list[tuple[int, int]]]:
    """(shapes of the padded global batch at the longest lengths, batch size, towers as
    [(texts, length)]) for a stage, in the format of :mod:`gte_jax.data.batching`."""
    config = parse(config)
    data = config.data  # data.max_length already resolved into both lengths
    lq, ld = data.query_max_length, data.doc_max_length
    b = max([config.train.batch_size] + [s.batch_size for s in data.sources])
    shapes = {
        "query_input_ids": (b, lq),
        "query_attention_mask": (b, lq),
        "doc_input_ids": (b, ld),
        "doc_attention_mask": (b, ld),
        "query_text_id": (b,),
        "doc_text_id": (b,),
        "valid": (b,),
    }
    towers = [(b, lq), (b, ld)]
    if config.kind == "mntp":  # one tower: the masked query role
        shapes["query_labels"] = (b, lq)
        return shapes, b, [(b, lq)]
    k = num_negatives(config)
    if k:
        shapes |= {
            "neg_input_ids": (b, k, ld),
            "neg_attention_mask": (b, k, ld),
            "neg_text_id": (b, k),
            "neg_valid": (b, k),
        }
        towers.append((b * k, ld))
    return shapes, b, towers


def num_negatives(config: StageSpec | ml_collections.ConfigDict) -> int:
    """K of the stage's batches as training gets it: the largest over the pair sources of each
    source's ``num_negatives``, or, where that is auto (-1), the count training reads from the
    data (:attr:`gte_jax.data.sources.Source.num_negatives`, from the same
    :func:`~gte_jax.data.pipeline.build_sources`). The largest: a mixed batch's K, and the
    costliest of one-source batches. Data that cannot be read here are not guessed at: the
    error names the setting that fixes K."""
    from gte_jax.data import pipeline
    from gte_jax.errors import ConfigError
    from gte_jax.textio import InputError

    config = parse(config)
    try:
        specs = pipeline._source_specs(config.data)
    except ConfigError as e:
        raise PlanError(f"{e}: plan needs the stage's sources (their num_negatives)") from None
    pairs = [s for s in specs if s["kind"] == "pairs"]
    auto = [s for s in pairs if int(s["num_negatives"]) < 0]
    if not auto:
        return max([0] + [int(s["num_negatives"]) for s in pairs])
    try:
        return max([0] + [src.num_negatives for src in pipeline.build_sources(config.data)])
    except (OSError, ValueError, InputError) as e:
        keys = [
            s["config_key"].removesuffix(".path") + ".num_negatives"
            if s["config_key"].startswith("data.sources[")
            else f"{s['config_key']} ({s['path']}: list it in data.sources with num_negatives)"
            for s in auto
        ]
        raise PlanError(
            f"num_negatives is auto (read from the data by training) and the data cannot be read "
            f"here ({e}); set {', '.join(keys)}, e.g. --config.data.sources.0.num_negatives=1"
        ) from None


# Parameters that do no matmul in an embedding step: embedding tables, a decoder's LM head.
_NOT_MATMUL = re.compile(r"embedding|embed_tokens|lm_head")
# The LM head's weights: its own, or the tied embedding table (gte_jax/models/decoder.py).
_LM_HEAD = re.compile(r"lm_head|embed_tokens")


def model_flops(
    params: Any,
    num_layers: int,
    hidden: int,
    towers: Sequence[tuple[int, int]],
    *,
    frozen: Any = None,
):
    """Analytic model FLOPs of one train step (forward + backward), the PaLM convention of
    benchmarks/mfu.py: per token 6 x (parameters outside the embeddings and LM head) for the
    matmuls plus 12 x layers x length x hidden for attention scores and values (``hidden``: the
    attention width, heads x head_dim, which decoders may set apart from the model width);
    ``towers`` = [(texts, length)] (queries, documents, hard negatives). ``frozen`` (LoRA's base):
    parameters with no weight gradient, 4 x per token (forward and the input gradient).
    Recomputation (remat, GradCache's second forward) is not counted: it is the model's work, not
    the hardware's. Causal masks and sliding windows are not discounted: XLA computes the full
    score matrix."""

    # Embedding tables are gathers, not matmuls: BERT's embeddings/*, T5's word embeddings and
    # relative position bias (every nnx.Embed's leaf is named "embedding"), a decoder's
    # embed_tokens; the LM head is not used by an embedding step (MNTP's: objectives.mntp).
    def matmul_params(tree: Any) -> int:
        return sum(
            int(np.prod(x.shape))
            for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if not _NOT_MATMUL.search(jax.tree_util.keystr(path))
        )

    per_token = 6 * matmul_params(params) + 4 * matmul_params(frozen or {})
    return sum(
        texts * length * (per_token + 12 * num_layers * length * hidden) for texts, length in towers
    )


def _with_lora(model: Any, config: StageSpec) -> Any:
    """``model`` with the stage's LoRA layers (``model.lora``), as training injects them."""
    from flax import nnx

    lora_cfg = lora.LoRAConfig.from_config(config.model.lora)
    if lora_cfg is not None:
        lora.inject(model, lora_cfg, rngs=nnx.Rngs(0))
    return model


@dataclasses.dataclass
class AbstractStep:
    """The stage's train step as ``train`` builds it (``train_step``) with abstract arguments."""

    step_fn: Any  # train_step.fn
    state: Any  # ShapeDtypeStructs with shardings
    batch: dict[str, Any]
    state_shardings: Any
    sharding: str
    num_chunks: int
    batch_size: int
    towers: list[tuple[int, int]]
    params: Any
    encoder: Any  # EncoderConfig
    total_steps: int
    train_step: TrainStep


def abstract_step(
    config: StageSpec | ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    hf_config: Mapping[str, Any],
):
    """The stage's real train step (:func:`gte_jax.training.step.build_train_step`) and
    abstract arguments (with its shardings) on ``mesh``."""
    from flax import nnx

    from gte_jax.models.encoder import BiEncoder, ModelFn

    config = parse(config)
    enc = encoder_config(hf_config, config.model)
    try:
        num_chunks = checks.check_config(config, mesh)
    except checks.TrainingError as e:
        raise PlanError(str(e)) from None
    abstract_model = nnx.eval_shape(
        lambda: _with_lora(
            BiEncoder(
                enc,
                pooling="mean" if config.model.pooling == "auto" else config.model.pooling,
                normalize=config.model.normalize,
                rngs=nnx.Rngs(0),
            ),
            config,
        )
    )
    model_fn, params = ModelFn.from_module(
        abstract_model, train_lm_head=checks.trains_lm_head(config)
    )
    trainable, frozen = model_fn.split_params(params)  # LoRA: the base frozen, as in training
    frozen = lora.cast_frozen(frozen, lora.base_dtype(config.model.lora))
    tcfg = config.train
    total_steps = tcfg.num_steps
    if total_steps < 1:
        raise PlanError(
            "train.num_steps is 0 (derived from the data's size and train.epochs): plan needs "
            "it, e.g. --config.train.num_steps=10000"
        )
    tx, schedule = make_optimizer(tcfg, total_steps)
    objective_state = objectives.from_config(config).initial_state()
    state = abstract_train_state(trainable, tx, tcfg.seed, frozen, objective_state)
    step = build_train_step(config, mesh, model_fn, tx, schedule, state, num_chunks=num_chunks)
    shapes, batch_size, towers = batch_shapes(config)
    return AbstractStep(
        step.fn, step.abstract_state(state), step.abstract_batch(shapes), step.state_shardings,
        config.sharding.params, num_chunks, batch_size, towers, params, enc, total_steps,
        step,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Compile and report
# --------------------------------------------------------------------------------------------------

_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|HbmOom")
# "... the total memory required for HLO temporaries (16.08G) exceeds available HBM (15.75G)"
_OOM_NEED = re.compile(r"required for ([\w ]+?) \(([\d.]+)([KMGT])?\)")
_OOM_HBM = re.compile(r"available HBM \(([\d.]+)([KMGT])?\)")


def _gib(number: str, unit: str | None) -> float:
    return float(number) * 1024 ** " KMGT".index(unit or " ") / GIB


def _sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (tiny and huge figures both stay readable)."""
    return float(f"{x:.{digits}g}") if x and math.isfinite(x) else x


def state_bytes_per_chip(state: Any) -> int:
    """Bytes of the (abstract, sharded) train state on one chip."""
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * x.dtype.itemsize
        for x in jax.tree.leaves(state)
    )


def compile_step(step: AbstractStep):
    """(compiled executable or None, error text when XLA refused for lack of memory)."""
    # The splash attention kernel (Mosaic) runs per data shard in a shard_map, which needs the
    # mesh set while tracing (gte_jax/models/attention.py).
    splash = getattr(step.encoder, "attention_kernel", "") == "splash"
    mesh = jax.tree.leaves(step.state_shardings)[0].mesh
    with jax.set_mesh(mesh) if splash else contextlib.nullcontext():
        lowered = step.train_step.lower(step.state, step.batch)
    try:
        return lowered.compile(), None
    except Exception as e:  # XLA's TPU compiler raises XlaRuntimeError / ValueError
        text = str(e)
        if _OOM.search(text):
            return None, text
        raise


def _advice(config: StageSpec, step: AbstractStep, sharding: str, arg_bytes: float, hbm: float):
    tcfg, data_devices = config.train, step.state["step"].sharding.mesh.shape["data"]
    out = []
    if not tcfg.gradcache:
        chunk = max(data_devices, 2 ** int(math.log2(max(step.batch_size // 16, 1))))
        while step.batch_size % chunk or chunk % data_devices:
            chunk //= 2
        if chunk >= data_devices and chunk < step.batch_size:
            out.append(
                "turn on GradCache, memory bounded by the chunk: --config.train.gradcache=true "
                f"--config.train.gradcache_chunk_size={chunk}"
            )
    else:
        gather, lora_run = config.sharding.gather_params, "frozen" in step.state
        if sharding != "replicate" and (
            gather == "per_step" or (gather, lora_run) == ("per_chunk", False)
        ):
            # the reduce-once modes hold the full weights (LoRA: its base) or a full-size
            # gradient per chip; per_layer gathers one layer at a time (FSDP's memory); LoRA
            # runs per_chunk as per_layer
            out.append(
                "gather FSDP weights layer by layer (one reduction per chunk): "
                "--config.sharding.gather_params=per_layer"
            )
        chunk = step.batch_size // step.num_chunks
        half = chunk // 2
        if half >= data_devices and half % data_devices == 0:
            out.append(f"smaller GradCache chunks: --config.train.gradcache_chunk_size={half}")
    if not config.model.remat:
        out.append("recompute activations per layer: --config.model.remat=true")
    if sharding == "replicate" and arg_bytes > 0.25 * hbm:
        out.append(
            "shard parameters and optimizer state over the chips (FSDP): "
            "--config.sharding.params=fsdp"
        )
    out.append("or a topology with more HBM per chip / more chips (--topology)")
    return out


def compiled_memory(compiled: Any) -> dict[str, float]:
    """Bytes per chip from XLA's buffer assignment: argument, output, alias, temp, code, peak."""
    ma = compiled.memory_analysis()
    out = {
        "argument": float(ma.argument_size_in_bytes),
        "output": float(ma.output_size_in_bytes),
        "alias": float(ma.alias_size_in_bytes),
        "temp": float(ma.temp_size_in_bytes),
        "code": float(getattr(ma, "generated_code_size_in_bytes", 0) or 0),
    }
    out["peak"] = float(getattr(ma, "peak_memory_in_bytes", 0) or 0) or (
        out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
    )
    return out


def _memory_report(report: dict, compiled: Any, oom: str, arg: float, hbm: float) -> bool:
    """Adds per-chip memory (GiB) to ``report`` from XLA's analysis (a compiled step, or a dict
    of :func:`compiled_memory`'s bytes, or its out-of-memory message); returns whether the step
    fits."""
    if compiled is not None:
        mem = compiled if isinstance(compiled, dict) else compiled_memory(compiled)
        argument, output, temp, peak = (mem[k] for k in ("argument", "output", "temp", "peak"))
        fits = peak <= hbm
        report |= {
            "argument_gib_per_chip": _sig(argument / GIB),
            "output_gib_per_chip": _sig(output / GIB),
            "temp_gib_per_chip": _sig(temp / GIB),
            "peak_gib_per_chip": _sig(peak / GIB),
            "fits": fits,
        }
    else:  # XLA refused: it stops at the first buffer class that overflows, so "at least"
        need, usable = _OOM_NEED.search(oom), _OOM_HBM.search(oom)
        temp = _gib(need.group(2), need.group(3)) if need else None
        report |= {
            "argument_gib_per_chip": _sig(arg / GIB),
            "output_gib_per_chip": None,
            "temp_gib_per_chip": _sig(temp) if temp is not None else None,
            "peak_gib_per_chip": _sig(arg / GIB + temp) if temp is not None else None,
            "fits": False,
            "xla_error": oom.strip().splitlines()[0][:400],
        }
        if usable:
            report["usable_hbm_gib"] = _sig(_gib(usable.group(1), usable.group(2)))
        fits = False
    return fits


_LAYER_KEYS = ("num_hidden_layers", "num_layers")  # BERT and the decoders; T5


def num_layers(hf_config: Mapping[str, Any]) -> int:
    for key in _LAYER_KEYS:
        if key in hf_config:
            return int(hf_config[key])
    raise PlanError(f"the model config has none of {_LAYER_KEYS}: its depth is unknown")


def with_layers(hf_config: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The same shape with ``n`` layers (per-layer lists such as ``layer_types`` cut to ``n``)."""
    out = dict(hf_config)
    for key in _LAYER_KEYS:
        if key in out:
            out[key] = n
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][:n]
    return out


def _extrapolated(config: StageSpec, mesh, hf_config, layers: Sequence[int]):
    """(bytes per chip extrapolated to the model's depth, or None; OOM text; the points).

    Compiles the step at each depth of ``layers`` (the same widths, batch and sharding) and fits
    every figure of :func:`compiled_memory` linearly in the layer count (least squares): the
    state, the activations a remat'd layer keeps and the gradients are per layer, and the working
    set of the layer being recomputed does not grow with depth. ``tests/test_plan.py`` checks the
    rule against a full compile. A depth that XLA refuses means the model cannot fit either."""
    full = num_layers(hf_config)
    points = []
    for n in layers:
        compiled, oom = compile_step(abstract_step(config, mesh, with_layers(hf_config, n)))
        if compiled is None:
            return None, oom, points
        cost = plan_cost.compiled_cost(compiled, mesh.devices.flat)  # FLOPs, bytes: linear too
        points.append({"layers": n, **compiled_memory(compiled), **cost})
    xs = np.asarray([p["layers"] for p in points], np.float64)
    out = {}
    for key in points[0]:
        if key == "layers":
            continue
        slope, intercept = np.polyfit(xs, [p[key] for p in points], 1)
        out[key] = max(float(intercept + slope * full), 0.0)
    return out, "", points


def _checked_layers(layers: Sequence[int] | None, hf_config: Mapping[str, Any]) -> list[int]:
    """``--layers`` sorted, or a :class:`PlanError` when they cannot extrapolate the model."""
    if not layers:
        return []
    layers = sorted({int(n) for n in layers})
    if len(layers) < 2 or layers[0] < 1 or layers[-1] >= num_layers(hf_config):
        raise PlanError(
            f"--layers {','.join(map(str, layers))}: give two or more depths, each from 1 "
            f"to fewer than the model's {num_layers(hf_config)} layers"
        )
    return layers


def plan(
    config: StageSpec | ml_collections.ConfigDict,
    topology: str | Topology,
    *,
    model_config: str | None = None,
    mfu: float = 0.4,
    stages: Mapping[str, Any] | None = None,
    layers: Sequence[int] | None = None,
    compile: bool = True,
    num_slices: int | None = None,
) -> dict[str, Any]:
    """Compiles one stage's train step for ``topology`` and returns the report (see the module
    doc). ``stages``: the multi-stage config, to follow ``model.init_from = "stage:NAME"``.
    ``compile=False``: the start-up checks, layout and analytic figures only (seconds).
    ``num_slices``: that many slices of ``topology`` (multislice; default ``mesh.slices``).
    ``layers`` (e.g. (1, 2)): compile at these depths and extrapolate the memory to the model's
    own (:func:`_extrapolated`), for models whose full compile needs more host memory than this
    machine has (a 7B unrolled step); FLOPs and the state size are the full model's."""
    topo = topology if isinstance(topology, Topology) else parse_topology(topology)
    config = parse(config)
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu {mfu}: must be in (0, 1]")
    hf_config, model_source = model_shape(config.model, model_config, stages)
    layers = _checked_layers(layers, hf_config)
    if num_slices is not None:
        config = config.replace(mesh=dataclasses.replace(config.mesh, slices=num_slices))
    slices = config.mesh.slices
    if slices < 1:
        raise PlanError(f"--num-slices / mesh.slices={slices}: must be >= 1")
    devices = topology_devices(topo, slices)
    mesh, start = start_checks(config, devices)
    step = abstract_step(config, mesh, hf_config)  # the full model, abstract (nothing compiled)
    head: dict[str, Any] = {
        "stage": config.stage,
        "topology": topo.name,
        "accelerator_type": topo.accelerator_type,
        "device_kind": devices[0].device_kind,
        "slices": slices,
        "chips": topo.chips * slices,
        "hbm_gib_per_chip": topo.chip.hbm_gib,
        **start,
    }
    if slices > 1:
        head["dcn_bytes_per_step_per_slice"] = dcn_bytes(step, slices)
    if not compile:
        return head | {
            "compiled": False,
            "state_gib_per_chip": _sig(state_bytes_per_chip(step.state) / GIB),
            **_time_report(config, step, topo, mfu, slices),
            "model": model_source,
        }
    t0 = time.perf_counter()
    if layers:
        compiled, oom, points = _extrapolated(config, mesh, hf_config, layers)
    else:
        compiled, oom = compile_step(step)
    compile_s = time.perf_counter() - t0

    hbm = topo.chip.hbm_gib * GIB
    arg = state_bytes_per_chip(step.state)
    report = dict(head)
    fits = _memory_report(report, compiled, oom, arg, hbm)
    report["verdict"] = "fits" if fits else "does not fit"
    if layers:
        report["memory_extrapolated_from_layers"] = [
            {
                "layers": p["layers"],
                **{f"{k}_gib_per_chip": _sig(p[k] / GIB) for k in ("argument", "temp", "peak")},
            }
            for p in points
        ]
        report["state_gib_per_chip"] = _sig(arg / GIB)  # exact: the full model's sharded state
    report |= _time_report(config, step, topo, mfu, slices) | {"model": model_source}
    report |= _compile_fields(compile_s)
    report |= _cost_report(compiled, mesh, report, topo, step, mfu) if compiled is not None else {}
    if not fits:
        report["advice"] = _advice(config, step, step.sharding, arg, hbm)
    return report


def _compile_fields(seconds: float) -> dict[str, Any]:
    """How the step was compiled: its seconds, and the libtpu flags (gte_jax/tpu_flags.py: the
    same ``train`` starts libtpu with)."""
    return {
        "compile_seconds": round(seconds, 1),
        "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
    }


def _cost_report(compiled: Any, mesh, report: dict, topo: Topology, step: AbstractStep, mfu: float):
    """What the compiled program does (:func:`gte_jax.plan_cost.time_fields`): the step time
    from it replaces the analytic one. ``compiled``: the executable, or the numbers
    :func:`_extrapolated` fitted in depth."""
    cost = (
        compiled
        if isinstance(compiled, dict)
        else plan_cost.compiled_cost(compiled, mesh.devices.flat)
    )
    # No cost figures: XLA could not print the program (a Mosaic kernel such as splash), so
    # compiled_cost gave {} and --layers fitted the memory alone. The analytic time stays.
    if "hardware_flops_per_chip" not in cost:
        return {"compiled_cost": "unavailable: XLA cannot print a program with Mosaic kernels"}
    return plan_cost.time_fields(
        cost,
        generation=topo.chip.generation,
        chips=report["chips"],
        mfu=mfu,
        model_flops=report["model_flops"],
        trainable_parameters=report["trainable_parameters"],
        batch_size=step.batch_size,
        num_steps=step.total_steps,
    )


def start_checks(
    config: StageSpec, devices: Sequence[Any]
) -> tuple[jax.sharding.Mesh, dict[str, Any]]:
    """The mesh ``train`` builds over ``devices`` and ``train``'s start-up checks for every
    process (host) of it: the config's (:func:`gte_jax.training.checks.check_config`, which
    includes each host's batch layout), and the per-source batch sizes the config names. (mesh,
    report fields); a failed check is a :class:`PlanError` naming it."""
    try:
        mesh = checks.run_mesh(config, devices)
        num_chunks = checks.check_config(config, mesh)
        sizes = {s.name or str(i): s.batch_size for i, s in enumerate(config.data.sources)}
        bad = checks.source_batch_problems(sizes, num_chunks, mesh.shape[shd.DATA_AXIS])
        if bad:
            raise checks.TrainingError("this config cannot run:\n  - " + "\n  - ".join(bad))
    except checks.TrainingError as e:
        raise PlanError(f"start_checks failed: {e}") from None
    layouts = shd.process_layouts(mesh)
    order = [d.process_index for d in mesh.devices[:, 0]]  # along "data", model index 0
    return mesh, {
        "processes": len(layouts),
        "devices_per_process": len(mesh.devices.flat) // len(layouts),
        "mesh": dict(mesh.shape),
        "data_blocks_per_process": next(iter(layouts.values())).groups,
        # How often the host changes along the "data" axis: 0 would mean one contiguous block
        # per host, which TPU meshes do not give (BatchLayout reads each host's blocks).
        "host_changes_along_data": sum(a != b for a, b in zip(order, order[1:], strict=False)),
        "start_checks": "passed",
    }


def dcn_bytes(step: AbstractStep, slices: int) -> dict[str, int]:
    """Bytes each slice sends over DCN per step (analytic, ring algorithms across slices; what
    stays within a slice is ICI): the float32 gradient all-reduce of the trainable parameters,
    2 (S-1)/S of their bytes (XLA reduces within a slice first, so each slice's share crosses
    DCN once each way), and the loss's all-gather of the other slices' float32 embeddings plus
    the reduce-scatter of their gradients, 2 (S-1)/S of the global batch's embedding bytes."""
    grads = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(step.state["params"]))
    dim = int(step.encoder.hidden_size)
    texts = sum(n for n, _ in step.towers)
    embeddings = 4 * texts * dim
    share = 2 * (slices - 1) / slices
    out = {
        "gradient_all_reduce": int(share * grads),
        "embedding_all_gather": int(share * embeddings),
    }
    out["total"] = sum(out.values())
    return out


def _time_report(
    config: StageSpec, step: AbstractStep, topo: Topology, mfu: float, slices: int = 1
) -> dict[str, Any]:
    """Analytic model FLOPs, time at ``mfu``, and what the step is (batch, lengths, settings)."""
    # Attention's width is heads x head_dim: hidden_size for BERT, not always for T5 (T5-11B).
    enc = step.encoder
    flops = model_flops(
        step.state["params"],  # what trains: every parameter, or LoRA's factors
        enc.num_hidden_layers,
        enc.num_attention_heads * enc.head_dim,
        step.towers,
        frozen=step.state.get("frozen"),
    )
    trainable = jax.tree_util.tree_leaves_with_path(step.state["params"])
    work = objectives.Workload(
        batch_size=step.batch_size,
        num_negatives=step.towers[2][0] // step.batch_size if len(step.towers) > 2 else 0,
        embed_dim=int(enc.hidden_size),
        towers=step.towers,
        vocab=int(getattr(enc, "vocab_size", 0) or 0),
        hidden=int(enc.hidden_size),
        trains_head=any(_LM_HEAD.search(jax.tree_util.keystr(p)) for p, _ in trainable),
    )
    # The objective's own work: the similarity matrices, or MNTP's LM head on masked positions.
    objective = objectives.from_config(config)
    loss_flops = objective.flops(work)
    flops += loss_flops
    loss_key = "lm_head_tflops_per_step" if objective.kind == "mntp" else "loss_tflops_per_step"
    peak_flops = topo.chip.peak_bf16_flops * topo.chips * slices
    step_s = flops / (peak_flops * mfu)
    return {
        "model_flops": flops,
        "model_tflops_per_step": _sig(flops / 1e12),
        **({loss_key: _sig(loss_flops / 1e12)} if loss_flops else {}),
        "loss_logits_gib": _sig(objective.memory_bytes(work) / GIB),
        "assumed_mfu": mfu,
        "peak_tflops": round(peak_flops / 1e12, 1),
        "step_seconds": _sig(step_s),
        "examples_per_second": _sig(step.batch_size / step_s),
        "num_steps": step.total_steps,
        "days": _sig(step.total_steps * step_s / 86400),
        "batch_size": step.batch_size,
        # An MNTP step has one tower (the masked texts), no documents.
        "lengths": {
            role: length
            for role, (_, length) in zip(("query", "doc"), step.towers[:2], strict=False)
        },
        "num_negatives": step.towers[2][0] // step.batch_size if len(step.towers) > 2 else 0,
        "gradcache": config.train.gradcache,
        "gradcache_chunk_size": step.batch_size // step.num_chunks
        if config.train.gradcache
        else None,
        "remat": config.model.remat,
        "dtype": compute_dtype(config.model.dtype, "tpu").name,
        "sharding": step.sharding,
        # GradCache's weight gathers (sharding.gather_params): rerun plan with the other value
        # to see the collective bytes and memory of each.
        "gather_params": config.sharding.gather_params if config.train.gradcache else None,
        "parameters": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(step.params))),
        # What the optimizer holds: every parameter, or the LoRA factors alone.
        "trainable_parameters": int(
            sum(int(np.prod(x.shape)) for x in jax.tree.leaves(step.state["params"]))
        ),
    }


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def stage_configs(
    config: ml_collections.ConfigDict, stage: str | None
) -> list[ml_collections.ConfigDict]:
    """The stage(s) of ``config`` to plan, as one-stage configs (named, replay filled in)."""
    from gte_jax.data import pipeline

    if "stages" not in config:
        if stage and stage != config.get("stage", ""):
            raise PlanError(
                f"--stage {stage!r}: this config has one stage, {config.get('stage')!r}"
            )
        return [config]
    names = list(config.stages)
    if stage and stage not in names:
        raise PlanError(f"--stage {stage!r}: this config's stages are {names}")
    out = []
    for name in [stage] if stage else names:
        c = config[name].copy_and_resolve_references()
        c.stage = name
        pipeline.resolve_replay(c.data, config)  # as train.run does: the replayed stage's sources
        out.append(c)
    return out
