"""Hugging Face / sentence-transformers I/O: safetensors directories <-> ``BiEncoder``.

Loading reads ``config.json`` + ``model.safetensors`` (or a sharded ``model.safetensors.index.json``)
with ``safetensors.numpy`` — no PyTorch — and maps torch names onto our module tree (torch
``Linear`` weights are (out, in): transposed). The sentence-transformers files, when present, decide
pooling, normalisation, projection and max length. Export writes a directory that both
``transformers.AutoModel`` and ``sentence_transformers.SentenceTransformer`` load with the same
embeddings as ours, plus a model card. INSTRUCTOR checkpoints (modules.json naming
``InstructorEmbedding.INSTRUCTOR_Transformer``) load as a Transformer whose pooling leaves the
instruction's tokens out (``include_prompt`` false), without running that package's code.

Paths are ``etils.epath`` paths: a directory can be local or remote (``gs://bucket/...``, read and
written through gcsfs). Remote weights are read and written as bytes; the tokenizer, which
transformers only reads and writes on local disk, goes through a temporary local copy.

Safety: configs that need remote code (``auto_map``, ``trust_remote_code``) and pickled weights
(``*.bin`` / ``*.pt``) are refused, never executed. gte-jax's own bidirectional Llama / Mistral /
Qwen exports (``gte_jax.hf_bidirectional``) name a modeling file for transformers; gte-jax reads
them from ``config.json`` alone and never runs that file.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors.numpy import load as load_bytes
from safetensors.numpy import load_file
from safetensors.numpy import save as save_bytes

import gte_jax.models.lora as lora
from gte_jax import hf_bidirectional
from gte_jax.models import registry, scan
from gte_jax.models.encoder import BiEncoder
from gte_jax.sharding import host_value

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Largest weights file an export writes (bytes); bigger models are sharded with an index, as
# transformers' save_pretrained does. Each shard is serialised in memory before its one write.
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Files a tokenizer never needs: not copied down from a remote model directory.
_NOT_TOKENIZER_SUFFIXES = (".safetensors", ".h5", ".msgpack") + tuple(
    p[1:] for p in _PICKLE_PATTERNS
)
# sentence-transformers pooling names <-> ours.
_ST_TO_POOLING = {
    "mean": "mean",
    "cls": "cls",
    "lasttoken": "last",
    "weightedmean": "weighted_mean",
}
_POOLING_TO_ST = {v: k for k, v in _ST_TO_POOLING.items()}
_ST_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ST_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
}
_ACTIVATION_TO_ST = {v: k for k, v in _ST_ACTIVATIONS.items()}
# Our key in config_sentence_transformers.json (sentence-transformers reads only its own keys).
INSTRUCTION_TEMPLATES_KEY = "gte_jax_instruction_templates"
# Legacy module paths: every sentence-transformers release from 2.x to 6.x resolves them.
_ST_MODULE_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Dense": "sentence_transformers.models.Dense",
    "Normalize": "sentence_transformers.models.Normalize",
}


@dataclasses.dataclass
class PretrainedInfo:
    """What a loaded directory said beyond the weights; export writes it back."""

    source: str = ""
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_seq_length: int | None = None
    include_prompt: bool = True
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    # The instruction templates training formatted instructions with (gte_jax.prompts
    # .training_templates), for gte_jax.prompts.resolve_template.
    instruction_templates: list[str] = dataclasses.field(default_factory=list)
    similarity_fn_name: str | None = None
    # sentence-transformers' truncate_dim (config_sentence_transformers.json): embeddings are cut
    # to their first truncate_dim coordinates (gte_jax.models.pooling.truncate_embeddings).
    truncate_dim: int | None = None
    # Tensors we carry but do not train (the BERT pooler), torch names -> arrays.
    extra_tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # Where config.json / weights / tokenizer live (a subfolder in old sentence-transformers dirs).
    transformer_dir: str = ""


# ----------------------------------------------------------------------------- reading files


def is_local(path: epath.PathLike) -> bool:
    """False for ``gs://`` and other URLs: paths that only ``epath`` (fsspec) can read."""
    return "://" not in os.fspath(path)


def _load_tensors(path: epath.Path) -> dict[str, np.ndarray]:
    if is_local(path):
        return load_file(os.fspath(path))
    return load_bytes(path.read_bytes())


# safetensors' dtype names (the header's "dtype").
_SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32",
    "float64": "F64", "int64": "I64", "uint64": "U64",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class HostTensor:
    """A tensor an export writes, brought to host memory only when its bytes are written: a leaf
    of the (possibly sharded) parameters, a row of a scanned tower's stacked leaf, or their
    transpose. One at a time, so no device or host ever holds the whole model
    (``sharding.host_value`` gathers the one array)."""

    source: Any  # a jax.Array or NumPy array
    row: int | None = None
    transpose: bool = False
    dtype: Any = np.float32

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.source.shape)[(0 if self.row is None else 1) :]
        return shape[::-1] if self.transpose else shape

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def T(self) -> HostTensor:  # noqa: N802 (NumPy's name)
        return dataclasses.replace(self, transpose=not self.transpose)

    def __getitem__(self, row: int) -> HostTensor:
        if self.row is not None or self.transpose:
            raise IndexError("HostTensor: only a whole leaf's rows can be taken")
        return dataclasses.replace(self, row=int(row))

    def value(self) -> np.ndarray:
        x = self.source if self.row is None else self.source[self.row]
        out = host_value(x).astype(self.dtype, copy=False)
        return out.T if self.transpose else out


def _save_tensors(tensors: dict[str, Any], path: epath.Path | None) -> None:
    """The bytes ``safetensors.numpy.save`` writes (tested equal), streamed: the header from the
    shapes alone, then each tensor fetched and written in turn (``tensors``: NumPy arrays or
    :class:`HostTensor`s). ``path`` None: the tensors are fetched in the same order and dropped
    (a process that takes part in each gather while another writes). Not safetensors' save_file: it creates the file with mode 600 whatever
    the umask, so the weights were the one file of an export that other users could not read."""
    metas = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in tensors.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in _safetensors_order(metas):
        shape, dtype = metas[name]
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype.name],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    if path is None:
        for name in list(header)[1:]:
            value = tensors[name]
            if isinstance(value, HostTensor):
                value.value()
        return
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in list(header)[1:]:
            value = tensors[name]
            array = value.value() if isinstance(value, HostTensor) else value
            array = np.asarray(array, dtype=metas[name][1])
            if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
                array = array.copy(order="C")
            if array.shape != metas[name][0]:
                raise ValueError(f"{name}: {array.shape} is not its header's {metas[name][0]}")
            f.write(array.reshape(-1).view(np.uint8).data)


def _safetensors_order(metas: dict[str, tuple[tuple[int, ...], np.dtype]]) -> list[str]:
    """The order safetensors lays tensors out in (by dtype, then name), taken from safetensors
    itself on empty stand-ins, so the streamed file is the one it would write."""
    dummies = {name: np.zeros((0,), dtype) for name, (_, dtype) in metas.items()}
    data = save_bytes(dummies)
    n = int.from_bytes(data[:8], "little")
    return [k for k in json.loads(data[8 : 8 + n]) if k != "__metadata__"]


def save_safetensors(
    tensors: dict[str, Any],
    directory: epath.PathLike | None,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Write ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` when the tensors exceed ``max_shard_size`` bytes.

    Shards are filled in order as huggingface_hub's ``split_state_dict_into_shards_factory``
    does (a tensor that would overflow the current shard starts a new one; a tensor bigger
    than the limit gets a shard of its own); the index is what transformers writes
    (``metadata.total_size`` / ``total_parameters``, ``weight_map``). Weight files of an earlier
    export in ``directory`` are removed first, so a reader never mixes the two. Returns the
    written file names. ``tensors``: NumPy arrays or :class:`HostTensor`s (each fetched as it is
    written); ``directory`` None: fetched in the same order, nothing written (``_save_tensors``).
    """
    directory = None if directory is None else epath.Path(directory)
    stale_files = [SAFETENSORS_FILE, SAFETENSORS_INDEX, *_shard_names(directory)]
    for stale in stale_files if directory is not None else []:
        if (directory / stale).exists():
            (directory / stale).unlink()
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        nbytes = array.nbytes
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += nbytes
    if directory is None:
        for shard in shards:
            _save_tensors(shard, None)
        return []
    if len(shards) == 1:
        _save_tensors(shards[0], directory / SAFETENSORS_FILE)
        return [SAFETENSORS_FILE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, file in zip(shards, files, strict=True):
        _save_tensors(shard, directory / file)
    index = {
        "metadata": {
            "total_parameters": int(sum(a.size for a in tensors.values())),
            "total_size": int(sum(a.nbytes for a in tensors.values())),
        },
        "weight_map": {
            name: file for shard, file in zip(shards, files, strict=True) for name in shard
        },
    }
    (directory / SAFETENSORS_INDEX).write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return [*files, SAFETENSORS_INDEX]


def _shard_names(directory: epath.Path | None) -> list[str]:
    if directory is None:
        return []
    return sorted(p.name for p in directory.glob("model-*-of-*.safetensors"))


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e}); fix or re-create the file.") from e


def _refuse_remote_code(directory: epath.Path) -> None:
    for name in ("config.json", "tokenizer_config.json"):
        path = directory / name
        if not path.exists():
            continue
        config = _read_json(path)
        # Our own bidirectional export names its modeling file; we read it by its config alone.
        if "auto_map" in config and not hf_bidirectional.is_own_export(config):
            raise ValueError(
                f"{path} has an `auto_map`: this model needs custom (remote) Python code, which "
                "gte-jax never runs. Use a model whose architecture gte-jax supports natively "
                "(no `auto_map`, no trust_remote_code)."
            )
    for name in ("sentence_bert_config.json", "config_sentence_transformers.json"):
        path = directory / name
        if path.exists() and _asks_remote_code(_read_json(path)):
            raise ValueError(
                f"{path} asks for trust_remote_code: gte-jax does not run remote code. Use a model "
                "that loads without it."
            )


def _asks_remote_code(obj: Any) -> bool:
    if isinstance(obj, dict):
        return obj.get("trust_remote_code") is True or any(map(_asks_remote_code, obj.values()))
    if isinstance(obj, list):
        return any(map(_asks_remote_code, obj))
    return False


def load_safetensors(directory: epath.PathLike) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` lists."""
    directory = epath.Path(directory)
    single, index = directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX
    if single.exists():
        return _load_tensors(single)
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no `weight_map`; it is not a safetensors shard index.")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).exists():
                raise FileNotFoundError(f"{index} lists shard {shard!r}, missing from {directory}.")
            tensors.update(_load_tensors(directory / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index}: tensors listed but not found in the shards: {missing[:10]}")
        return tensors
    pickles = sorted(p.name for pattern in _PICKLE_PATTERNS for p in directory.glob(pattern))
    if pickles:
        raise ValueError(
            f"{directory} has only pickled weights ({', '.join(pickles)}); gte-jax never loads "
            "pickles (they can run arbitrary code). Convert them once, in an environment you "
            "trust, to safetensors, e.g. `transformers.AutoModel.from_pretrained(DIR)"
            ".save_pretrained(OUT, safe_serialization=True)`, and load OUT."
        )
    raise FileNotFoundError(
        f"{directory} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}: not a Hugging Face "
        "model directory."
    )


def _read_sentence_transformers(directory: epath.Path) -> tuple[epath.Path, dict[str, Any]]:
    """Parse modules.json and friends: -> (transformer dir, settings for BiEncoder / info)."""
    settings: dict[str, Any] = {}
    modules_path = directory / "modules.json"
    transformer_dir = directory
    if modules_path.exists():
        instructor = False
        for module in sorted(_read_json(modules_path), key=lambda m: m.get("idx", 0)):
            kind, from_instructor = _module_kind(module, modules_path)
            module_dir = directory / module.get("path", "")
            if kind == "Transformer":
                transformer_dir = module_dir
                instructor = from_instructor
            elif kind == "Pooling":
                settings.update(_read_pooling(module_dir / "config.json"))
            elif kind == "Dense":
                settings.update(_read_dense(module_dir))
            elif kind == "Normalize":
                settings["normalize"] = True
        settings.setdefault("normalize", False)
        if instructor:  # INSTRUCTOR_Transformer zeroes the instruction's tokens before pooling
            settings["include_prompt"] = False
            logger.info("%s: an INSTRUCTOR checkpoint: instructions are not pooled", directory)
    for folder in dict.fromkeys((transformer_dir, directory)):
        st_config = folder / "sentence_bert_config.json"
        if st_config.exists():
            max_len = _read_json(st_config).get("max_seq_length")
            if max_len:
                settings["max_seq_length"] = int(max_len)
            break
    tokenizer_config = transformer_dir / "tokenizer_config.json"
    if "max_seq_length" not in settings and tokenizer_config.exists():
        # sentence-transformers >= 6 saves it only here: its max_seq_length is the tokenizer's
        # model_max_length (capped by the model's own limit when loaded).
        max_len = _read_json(tokenizer_config).get("model_max_length")
        if isinstance(max_len, int) and max_len > 0:
            settings["max_seq_length"] = max_len
    st_model = directory / "config_sentence_transformers.json"
    if st_model.exists():
        st = _read_json(st_model)
        settings["prompts"] = dict(st.get("prompts") or {})
        settings["default_prompt_name"] = st.get("default_prompt_name")
        settings["similarity_fn_name"] = st.get("similarity_fn_name")
        settings["truncate_dim"] = st.get("truncate_dim")
        settings["instruction_templates"] = list(st.get(INSTRUCTION_TEMPLATES_KEY) or [])
    return transformer_dir, settings


def _module_kind(module: dict[str, Any], modules_path: epath.Path) -> tuple[str, bool]:
    """(the sentence-transformers module a modules.json entry is, whether INSTRUCTOR's).

    INSTRUCTOR checkpoints (Su et al., 2023) name their first two modules after the
    InstructorEmbedding package (``InstructorEmbedding.INSTRUCTOR_Transformer``; the package's
    own save writes the module path ``InstructorEmbedding.instructor``), and its loader picks
    them by position whatever the type says: idx 0 is a Transformer whose pooling leaves the
    instruction's tokens out, idx 1 a Pooling. Read as such: no code of that package runs."""
    type_ = str(module.get("type", ""))
    kind = type_.rsplit(".", 1)[-1]
    if type_.startswith("InstructorEmbedding."):
        by_idx = {0: "Transformer", 1: "Pooling"}.get(module.get("idx"))
        if by_idx and kind in (f"INSTRUCTOR_{by_idx}", "instructor"):
            return by_idx, True
    elif type_.startswith("sentence_transformers.") and kind in _ST_MODULE_TYPES:
        return kind, False
    raise ValueError(
        f"{modules_path}: module {module.get('type')!r} (idx {module.get('idx')}) is not "
        f"supported; gte-jax reads sentence-transformers {sorted(_ST_MODULE_TYPES)} modules and "
        "INSTRUCTOR's (InstructorEmbedding.INSTRUCTOR_Transformer at idx 0, "
        "INSTRUCTOR_Pooling at idx 1) only."
    )


def _read_pooling(path: epath.Path) -> dict[str, Any]:
    cfg = _read_json(path)
    modes = cfg.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _ST_LEGACY_POOLING_KEYS.items() if cfg.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in _ST_TO_POOLING:
        raise ValueError(
            f"{path}: pooling {modes} is not supported; gte-jax pools with exactly one of "
            f"{sorted(_ST_TO_POOLING)}."
        )
    return {
        "pooling": _ST_TO_POOLING[modes[0]],
        "include_prompt": bool(cfg.get("include_prompt", True)),
    }


def _read_dense(module_dir: epath.Path) -> dict[str, Any]:
    cfg = _read_json(module_dir / "config.json")
    activation = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in _ST_ACTIVATIONS or cfg.get("use_residual"):
        raise ValueError(
            f"{module_dir}: Dense with activation {activation!r} "
            f"(use_residual={cfg.get('use_residual', False)}) is not supported; supported "
            f"activations: {sorted(_ST_ACTIVATIONS)}, without residual."
        )
    tensors = load_safetensors(module_dir)
    weight = tensors["linear.weight"]  # [out, in]
    return {
        "projection_dim": int(cfg["out_features"]),
        "projection_bias": bool(cfg.get("bias", True)),
        "projection_activation": _ST_ACTIVATIONS[activation],
        "projection_tensors": {
            "kernel": weight.T,
            **({"bias": tensors["linear.bias"]} if "linear.bias" in tensors else {}),
        },
    }


# ----------------------------------------------------------------------------- load


def load_tokenizer(directory: epath.PathLike):
    """``AutoTokenizer.from_pretrained`` on a directory, offline, no remote code. A remote one
    (``gs://``) is copied to a temporary local directory first (its files, not the weights)."""
    from transformers import AutoTokenizer

    directory = epath.Path(directory)
    _refuse_remote_code(directory)
    if is_local(directory):
        return AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)
    tmp = tempfile.TemporaryDirectory(prefix="gte_jax_tokenizer_")
    for path in directory.iterdir():
        if path.suffix not in _NOT_TOKENIZER_SUFFIXES and path.is_file():
            pathlib.Path(tmp.name, path.name).write_bytes(path.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(tmp.name, local_files_only=True)
    # Slow (sentencepiece) tokenizers copy their vocabulary file on save: keep it while they live.
    tokenizer._gte_jax_local_copy = tmp
    return tokenizer


def load_pretrained(
    path: epath.PathLike, *, dtype: Any = jnp.float32, host: bool = False, **config_overrides: Any
) -> tuple[BiEncoder, Any, PretrainedInfo]:
    """Load an HF / sentence-transformers directory (local or ``gs://``) -> (BiEncoder, tokenizer,
    info).

    ``dtype`` is the compute dtype (params stay float32); ``config_overrides`` go to the
    family's config (``gte_jax.models.registry``: e.g. ``remat=True``, ``dropout=0.0``).
    """
    model, info = load_model(path, dtype=dtype, host=host, **config_overrides)
    return model, load_tokenizer(info.transformer_dir), info


def _model_dirs(directory: epath.Path) -> tuple[epath.Path, dict[str, Any]]:
    """(the transformer's directory, sentence-transformers settings) of a model directory,
    refusing remote code and what is not a Hugging Face model."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; pass a model directory.")
    _refuse_remote_code(directory)
    transformer_dir, st = _read_sentence_transformers(directory)
    if transformer_dir != directory:
        _refuse_remote_code(transformer_dir)
    if not (transformer_dir / "config.json").exists():
        raise FileNotFoundError(f"{transformer_dir} has no config.json: not a Hugging Face model.")
    return transformer_dir, st


def load_model(
    path: epath.PathLike, *, dtype: Any = jnp.float32, host: bool = False, **config_overrides: Any
) -> tuple[BiEncoder, PretrainedInfo]:
    """``load_pretrained`` without the tokenizer (weights + sentence-transformers settings).

    ``host=True`` leaves the parameters as NumPy arrays in host memory, so a caller can place
    them straight onto their shards; otherwise they are put on the default device. A model too
    big for one host's memory loads with :func:`gte_jax.sharded_io.load_model_sharded` (each
    host reads only the slices its devices hold)."""
    tensors: dict[str, np.ndarray] = {}

    def read_all(transformer_dir: epath.Path) -> set[str]:
        tensors.update(load_safetensors(transformer_dir))
        return set(tensors)

    plan = plan_load(path, read_all, dtype=dtype, **config_overrides)
    canonical = {plan.family.canonical_name(k): v for k, v in tensors.items()}
    pure = nnx.to_pure_dict(plan.state)
    for name, (where, transpose) in plan.names.items():
        array = canonical[name].astype(np.float32)
        _set_leaf(pure, where, array.T if transpose else array, name)
    for leaf, array in plan.st.get("projection_tensors", {}).items():
        _set_leaf(pure, ("projection", leaf), array.astype(np.float32), f"Dense {leaf}")
    if not host:
        pure = jax.tree.map(jnp.asarray, pure)
    extra = {k: canonical[k] for k in plan.extra_names}
    return plan.finish(pure, extra)


@dataclasses.dataclass
class LoadPlan:
    """What a model directory says before its weights are read: the config, the abstract model
    (``nnx.eval_shape``: nothing allocated) and the map from checkpoint names to its leaves.
    ``load_model`` fills it from whole tensors, ``gte_jax.sharded_io`` slice by slice."""

    directory: epath.Path
    transformer_dir: epath.Path
    st: dict[str, Any]
    hf_config: dict[str, Any]
    family: Any
    config: Any
    graphdef: Any
    state: Any
    # {canonical torch name: (path in the param state, transpose?)} (the family's param_names)
    names: dict[str, tuple[tuple[Any, ...], bool]]
    # {canonical name: the name in the files}, every tensor the checkpoint holds
    file_names: dict[str, str]
    extra_names: list[str]

    def finish(self, pure: dict, extra: dict[str, np.ndarray]) -> tuple[BiEncoder, PretrainedInfo]:
        """The model with ``pure`` (every leaf filled) as its state, and its info."""
        self.state.replace_by_pure_dict(pure)
        model = nnx.merge(self.graphdef, self.state)
        st, config = self.st, self.config
        max_len = st.get("max_seq_length") or config.max_length
        info = PretrainedInfo(
            source=str(self.directory),
            hf_config=self.hf_config,
            max_seq_length=min(int(max_len), config.max_length),
            include_prompt=st.get("include_prompt", True),
            prompts=st.get("prompts", {}),
            default_prompt_name=st.get("default_prompt_name"),
            instruction_templates=st.get("instruction_templates", []),
            similarity_fn_name=st.get("similarity_fn_name"),
            truncate_dim=st.get("truncate_dim"),
            extra_tensors=extra,
            transformer_dir=str(self.transformer_dir),
        )
        return model, info


def plan_load(
    path: epath.PathLike,
    tensor_names: Any,
    *,
    dtype: Any = jnp.float32,
    **config_overrides: Any,
) -> LoadPlan:
    """The :class:`LoadPlan` of a model directory; ``tensor_names(transformer_dir)`` gives the
    names of the tensors its weight files hold. Refuses remote code, missing encoder tensors."""
    directory = epath.Path(path)
    transformer_dir, st = _model_dirs(directory)
    hf_config = hf_bidirectional.plain_config(_read_json(transformer_dir / "config.json"))
    family = registry.family_for(hf_config.get("model_type", "bert"))
    config = family.config_from_hf(hf_config, dtype=dtype, **config_overrides)
    file_names = {family.canonical_name(k): k for k in tensor_names(transformer_dir)}
    config = family.fit_to_tensors(config, set(file_names))
    model = nnx.eval_shape(
        lambda: BiEncoder(
            config,
            pooling=st.get("pooling", "mean"),
            normalize=st.get("normalize", False),
            projection_dim=st.get("projection_dim"),
            projection_bias=st.get("projection_bias", True),
            projection_activation=st.get("projection_activation", "identity"),
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, state = nnx.split(model)
    names = family.param_names(config)
    missing = sorted(set(names) - set(file_names))
    if missing:
        raise ValueError(
            f"{transformer_dir}: {len(missing)} encoder tensors missing, e.g. {missing[:8]}. "
            f"Expected a {config.model_type} checkpoint as transformers writes it "
            f"({family.architecture(config)})."
        )
    extra = sorted(k for k in file_names if k not in names and family.keep.search(k))
    ignored = sorted(
        k for k in file_names if k not in names and k not in extra and family.ignored.search(k)
    )
    unexpected = sorted(set(file_names) - set(names) - set(extra) - set(ignored))
    if extra or ignored:
        logger.info(
            "%s: not part of the encoder, not trained: %s", transformer_dir, extra + ignored
        )
    if unexpected:
        logger.warning("%s: ignoring unexpected tensors %s", transformer_dir, unexpected[:20])
    return LoadPlan(
        directory, transformer_dir, st, hf_config, family, config, graphdef, state, names,
        file_names, extra,
    )  # fmt: skip


def _set_leaf(tree: dict, path: Iterable[Any], array: np.ndarray, name: str) -> None:
    # A scanned tower stores its layers stacked: a layer index in ``path`` is a row (models/scan).
    expected = scan.set_leaf(tree, tuple(path), array)
    if tuple(array.shape) != expected:
        raise ValueError(
            f"tensor {name}: shape {tuple(array.shape)} does not fit the config's {expected}; "
            "config.json and the weights disagree."
        )


# ----------------------------------------------------------------------------- export


def _params_host(model: BiEncoder) -> dict[str, Any]:
    """The model's parameters as :class:`HostTensor`s (float32): fetched one by one as written."""
    return jax.tree_util.tree_map(HostTensor, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _get_leaf(tree: dict, path: Iterable[Any]) -> np.ndarray:
    return scan.get_leaf(tree, tuple(path))


def _write_json(path: epath.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_tokenizer(tokenizer: Any, out: epath.Path) -> None:
    """``save_pretrained``, which writes local files only: a remote ``out`` gets a local copy's files."""
    if is_local(out):
        tokenizer.save_pretrained(os.fspath(out))
        return
    with tempfile.TemporaryDirectory(prefix="gte_jax_tokenizer_") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(pathlib.Path(tmp).rglob("*")):
            if path.is_file():
                target = out / path.relative_to(tmp).as_posix()
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())


def _versions() -> dict[str, str]:
    out = {}
    for package in ("sentence-transformers", "transformers", "gte-jax"):
        try:
            out[package.replace("-", "_")] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _transformer_tensors(params: dict, info: PretrainedInfo, config: Any) -> dict[str, Any]:
    """{name in the export: HostTensor or array} of model.safetensors, in the family's names."""
    family = registry.family_of(config)
    tensors: dict[str, Any] = {
        family.export_name(config, name): (
            _get_leaf(params, where).T if transpose else _get_leaf(params, where)
        )
        for name, (where, transpose) in family.param_names(config).items()
    }
    tensors.update(
        {
            family.export_name(config, k): np.ascontiguousarray(v, dtype=np.float32)
            for k, v in info.extra_tensors.items()
        }
    )
    return tensors


def _dense_tensors(params: dict) -> dict[str, Any]:
    """The sentence-transformers Dense module's tensors (torch Linear: [out, in])."""
    proj = params["projection"]
    dense = {"linear.weight": proj["kernel"].T}
    if "bias" in proj:
        dense["linear.bias"] = proj["bias"]
    return dense


def _write_transformer(
    model: BiEncoder,
    params: dict,
    tokenizer: Any,
    out: epath.Path,
    info: PretrainedInfo,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    *,
    config: Any = None,
) -> int:
    """model.safetensors, config.json and the tokenizer (what AutoModel loads); returns the max
    sequence length written. ``config``: the model's, or a variant of it to write."""
    config = model.config if config is None else config
    tensors = _transformer_tensors(params, info, config)
    save_safetensors(tensors, out, max_shard_size=max_shard_size)

    hf = {
        k: v
        for k, v in info.hf_config.items()
        if k not in ("_name_or_path", "transformers_version", "torch_dtype", "auto_map")
    }
    hf.update(config.to_hf())
    hf["architectures"] = [registry.family_of(config).architecture(config)]
    hf["dtype"] = "float32"
    code_files: dict[str, str] = {}
    if hf_bidirectional.needs_remote_code(hf):
        hf, code_files = hf_bidirectional.export_config(hf)
    stale = out / f"{hf_bidirectional.MODULE}.py"
    if stale.exists() and stale.name not in code_files:
        stale.unlink()
    for name, text in code_files.items():
        (out / name).write_text(text, encoding="utf-8")
    _write_json(out / "config.json", hf)

    max_seq_length = info.max_seq_length or min(
        int(getattr(tokenizer, "model_max_length", config.max_length)), config.max_length
    )
    # sentence-transformers >= 6 keeps max_seq_length in the tokenizer config; older ones in
    # sentence_bert_config.json: write both.
    saved_max = tokenizer.model_max_length
    tokenizer.model_max_length = max_seq_length
    try:
        _save_tokenizer(tokenizer, out)
    finally:
        tokenizer.model_max_length = saved_max
    return max_seq_length


def _write_sentence_transformers_modules(
    model: BiEncoder, params: dict, out: epath.Path, info: PretrainedInfo, max_seq_length: int
) -> None:
    """modules.json and the Pooling / Dense / Normalize modules sentence-transformers loads, with
    the prompts and include_prompt the model was trained with."""
    config = model.config
    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST_MODULE_TYPES["Transformer"]}]
    _write_json(
        out / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": False},
    )
    pooling_cfg = {"word_embedding_dimension": config.hidden_size}
    st_mode = _POOLING_TO_ST[model.pooling]
    pooling_cfg.update({key: mode == st_mode for key, mode in _ST_LEGACY_POOLING_KEYS.items()})
    pooling_cfg["include_prompt"] = info.include_prompt
    _write_json(out / "1_Pooling" / "config.json", pooling_cfg)
    modules.append(
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_MODULE_TYPES["Pooling"]}
    )
    if model.projection is not None:
        proj = params["projection"]
        dense_dir = out / f"{len(modules)}_Dense"
        dense_dir.mkdir(parents=True, exist_ok=True)
        _save_tensors(_dense_tensors(params), dense_dir / SAFETENSORS_FILE)
        _write_json(
            dense_dir / "config.json",
            {
                "in_features": config.hidden_size,
                "out_features": model.embedding_dim,
                "bias": "bias" in proj,
                "activation_function": _ACTIVATION_TO_ST[model.projection_activation],
            },
        )
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": dense_dir.name,
                "type": _ST_MODULE_TYPES["Dense"],
            }
        )
    if model.normalize:
        norm_dir = out / f"{len(modules)}_Normalize"
        _write_json(norm_dir / "config.json", {})
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": norm_dir.name,
                "type": _ST_MODULE_TYPES["Normalize"],
            }
        )
    _write_json(out / "modules.json", modules)
    _write_json(
        out / "config_sentence_transformers.json",
        {
            "__version__": _versions(),
            "model_type": "SentenceTransformer",
            "prompts": info.prompts,
            "default_prompt_name": info.default_prompt_name,
            "similarity_fn_name": info.similarity_fn_name or "cosine",
            **({"truncate_dim": int(info.truncate_dim)} if info.truncate_dim else {}),
            **(
                {INSTRUCTION_TEMPLATES_KEY: sorted(info.instruction_templates)}
                if info.instruction_templates
                else {}
            ),
        },
    )


def export_pretrained(
    model: BiEncoder,
    tokenizer: Any,
    out_dir: epath.PathLike,
    *,
    card: dict[str, Any] | None = None,
    info: PretrainedInfo | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    atomic: bool = True,
    lm_head: bool = True,
    write: bool = True,
) -> epath.Path:
    """Write a directory that transformers' AutoModel and SentenceTransformer both load.

    Tensor by tensor: each parameter is brought to host memory alone as it is written
    (:class:`HostTensor`), never the whole model. Parameters sharded across processes are
    gathered one array at a time, a collective: call this on every process, with ``write`` True
    on one (process 0) and False on the others, which take part in each gather, in the same
    order, and write nothing.

    ``atomic``: written as :func:`gte_jax.storage.complete_dir` writes (under a temporary name,
    the completion marker last), so a full disk or a kill never leaves a half-written model
    under ``out_dir``; False for a caller that adds files and marks the directory itself.

    ``lm_head=False`` (a model exported for embedding): a decoder with an untied LM head is
    written as the plain ``*Model`` (``MistralModel``, ...) without ``lm_head.weight``, which
    AutoModel would otherwise report as an unexpected weight and no embedding reads. A workdir's
    ``base_model/`` keeps it (an MNTP stage trains it).

    Weights over ``max_shard_size`` bytes are written as shards with an index
    (``save_safetensors``).

    ``info`` (from ``load_pretrained``) carries what the source said beyond our params: the
    original config fields, prompts, max length, the untrained pooler. ``card`` fills the model
    card: keys ``model_name``, ``base_model``, ``language``, ``license``, ``description``,
    ``stages`` (list of str or dict), ``data_sources`` (list), ``metrics`` (dict name -> value).
    """
    out = epath.Path(out_dir)
    if not write:
        _gather_for_export(model, info or PretrainedInfo(), max_shard_size, lm_head)
        return out
    if atomic:
        from gte_jax import storage

        with storage.complete_dir(out) as tmp:
            export_pretrained(
                model, tokenizer, tmp, card=card, info=info, max_shard_size=max_shard_size,
                atomic=False, lm_head=lm_head,
            )  # fmt: skip
        return out
    out.mkdir(parents=True, exist_ok=True)
    info = info or PretrainedInfo()
    model = lora.merge(model)  # LoRA layers written back as W + s·A·B: a plain HF model
    config = model.config
    if not lm_head and getattr(config, "has_lm_head", False):
        config = dataclasses.replace(config, causal_lm=False)
    params = _params_host(model)
    max_seq_length = _write_transformer(
        model, params, tokenizer, out, info, max_shard_size, config=config
    )
    _write_sentence_transformers_modules(model, params, out, info, max_seq_length)
    (out / "README.md").write_text(
        model_card(model, info, card or {}, max_seq_length), encoding="utf-8"
    )
    logger.info(
        "exported %s (%s, dim %d) to %s", config.model_type, model.pooling, model.embedding_dim, out
    )
    return out


def _gather_for_export(
    model: BiEncoder, info: PretrainedInfo, max_shard_size: int, lm_head: bool
) -> None:
    """What a process that does not write does in ``export_pretrained(write=False)``: every
    tensor the writer writes, gathered in the writer's order (the same functions), dropped."""
    model = lora.merge(model)
    config = model.config
    if not lm_head and getattr(config, "has_lm_head", False):
        config = dataclasses.replace(config, causal_lm=False)
    params = _params_host(model)
    save_safetensors(
        _transformer_tensors(params, info, config), None, max_shard_size=max_shard_size
    )
    if model.projection is not None:
        _save_tensors(_dense_tensors(params), None)


PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def export_lora_adapter(
    model: BiEncoder, out_dir: epath.PathLike, *, base_model_name_or_path: str = ""
) -> epath.Path:
    """The LoRA factors alone in PEFT's format (``adapter_config.json`` +
    ``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained`` loads on the base
    transformers model (``AutoModel`` of the exported base). Torch module names come from the
    family's name map (``registry`` ``param_names``: the torch ``...weight`` whose kernel is the
    layer's), so every family of :mod:`gte_jax.models.registry` exports the same way."""
    layers = lora.lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: there is no adapter to export")
    kernel_to_torch = {
        tuple(where): name
        for name, (where, transpose) in registry.family_of(model.config)
        .param_names(model.config)
        .items()
        if where[-1] == "kernel" and transpose and name.endswith(".weight")
    }
    tensors, modules = {}, []
    depth = model.config.num_hidden_layers
    for stacked_path, layer in layers:
        # A scanned tower's LoRA layer holds every layer's factors ([layers, ...]): one row each.
        for row, path in scan.unstacked(tuple(stacked_path), depth):
            torch_weight = kernel_to_torch.get(tuple(path) + ("kernel",))
            if torch_weight is None:
                raise ValueError(
                    f"LoRA layer {'/'.join(map(str, path))} has no torch name to export"
                )
            module = torch_weight.removesuffix(".weight")
            modules.append(module)
            # torch Linear weights are (out, in): A^T [r, in], B^T [out, r].
            for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                array = host_value(getattr(layer, ours)[...]).astype(np.float32)
                array = array if row is None else array[row]
                tensors[f"base_model.model.{module}.{theirs}.weight"] = np.ascontiguousarray(
                    array.T
                )
    first = layers[0][1]
    if any((m.rank, m.alpha, m.dropout_rate) != (first.rank, first.alpha, first.dropout_rate)
           for _, m in layers):  # fmt: skip
        raise ValueError("LoRA layers with different rank / alpha / dropout: not one PEFT config")
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(tensors, out / PEFT_WEIGHTS_FILE)
    _write_json(
        out / PEFT_CONFIG_FILE,
        {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path or None,
            "r": first.rank,
            "lora_alpha": first.alpha,
            "lora_dropout": first.dropout_rate,
            # Full module names: PEFT matches a list entry exactly or as a suffix after a dot, and
            # a short "output.dense" would also catch BERT's "attention.output.dense".
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
        },
    )
    logger.info(
        "exported the LoRA adapter (%d layers, rank %d) to %s", len(layers), first.rank, out
    )
    return out


def card_ref(value: Any) -> str:
    """A model or data reference as a model card shows it: a Hub id, a ``stage:`` name or a
    relative path as given; a local absolute path, ``~`` path or URL (``gs://``, ``file://``) by
    its last component. The card travels with the model; the writer's directories do not, and
    they can name users and buckets."""
    text = str(value)
    if text.startswith(("/", "~", "\\")) or "://" in text or text[1:3] in (":\\", ":/"):
        return text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or text
    return text


def _card_header(card: dict[str, Any], base_model: Any, sources: list) -> list[str]:
    """The model card's YAML front matter (what the Hugging Face Hub indexes)."""
    header = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity"]
    header += [
        "tags:",
        "- sentence-transformers",
        "- feature-extraction",
        "- sentence-similarity",
        "- gte-jax",
    ]
    if base_model:
        header.append(f"base_model: {json.dumps(str(base_model))}")
    for key in ("language", "license"):
        if card.get(key):
            header.append(f"{key}: {card[key]}")
    if sources:
        header.append("datasets:")
        header += [f"- {json.dumps(str(s))}" for s in sources]
    header.append("---")
    return header


def _card_training(card: dict[str, Any], sources: list) -> list[str]:
    """The model card's training stages, data and evaluation sections."""
    lines: list[str] = []
    stages = card.get("stages") or []
    if stages:
        lines += ["", "## Training stages", ""]
        for i, stage in enumerate(stages, 1):
            if isinstance(stage, dict):
                stage = {
                    k: [card_ref(x) for x in v] if k == "data" and isinstance(v, list) else v
                    for k, v in stage.items()
                }
                detail = ", ".join(f"{k}: {v}" for k, v in stage.items() if k != "name")
                lines.append(
                    f"{i}. {stage.get('name', f'stage {i}')}" + (f" — {detail}" if detail else "")
                )
            else:
                lines.append(f"{i}. {stage}")
    if sources:
        lines += ["", "## Training data", ""] + [f"- {s}" for s in sources]
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        for key, value in metrics.items():
            lines.append(
                f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"
            )
    return lines


def model_card(
    model: BiEncoder, info: PretrainedInfo, card: dict[str, Any], max_seq_length: int
) -> str:
    """A sentence-transformers style README.md: YAML header, architecture, training, metrics."""
    config = model.config
    base_model = card.get("base_model") or info.source or None
    base_model = card_ref(base_model) if base_model else None
    sources = [card_ref(s) for s in card.get("data_sources") or []]
    header = _card_header(card, base_model, sources)
    name = card.get("model_name", "gte-jax text-embedding model")
    lines = header + ["", f"# {name}", ""]
    if card.get("description"):
        lines += [str(card["description"]), ""]
    lines += [
        "Trained with gte-jax (GTE multi-stage contrastive recipe, JAX/Flax).",
        "",
        "## Model",
        "",
        f"- Architecture: {registry.family_of(config).architecture(config)}, "
        f"{config.num_hidden_layers} layers, "
        f"hidden size {config.hidden_size}, {config.num_attention_heads} heads",
        f"- Base model: {base_model or 'trained from scratch / unknown'}",
        f"- Pooling: {model.pooling}"
        + ("" if info.include_prompt else " (prompt tokens excluded)"),
        f"- Embedding dimension: {model.embedding_dim}"
        + (
            f" (linear projection, {model.projection_activation})"
            if model.projection is not None
            else ""
        ),
        f"- Normalised: {'yes (use cosine or dot product)' if model.normalize else 'no'}",
        f"- Max sequence length: {max_seq_length} tokens",
    ]
    if info.prompts:
        lines.append(
            "- Prompts: " + ", ".join(f"`{k}`: {json.dumps(v)}" for k, v in info.prompts.items())
        )
    lines += _card_training(card, sources)
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("PATH_TO_THIS_DIRECTORY")',
        'embeddings = model.encode(["first text", "second text"])',
        "```",
        "",
        "With gte-jax: `gte-jax encode --model PATH_TO_THIS_DIRECTORY --input texts.txt --output emb.npy`.",
        "",
    ]
    return "\n".join(lines)
