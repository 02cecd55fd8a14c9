"""A model family is one place (gte_jax/models/registry.py): every parameter each registered
family can have carries declared logical axes, every projection inside a block is a LoRA target,
and the shardings that sharding.py derives from the families equal an expectation written here
from the rule table (tensor parallelism: heads / mlp / vocab over "model"; FSDP: a matrix's
largest free dim over "data")."""

from __future__ import annotations

import dataclasses
import re

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from tiny_models import FAMILIES as DECODER_TYPES
from tiny_models import TINY_T5, TINY_T5_V11

from gte_jax import sharding as shd
from gte_jax.models import lora, lora_layer, registry
from gte_jax.models.encoder import BiEncoder

_DECODER = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "architectures": ["LlamaForCausalLM"],  # causal_lm: the untied lm_head is built
}
_DECODER_EXTRA = {  # what each decoder type has on top (biases, q/k norms, sandwich norms)
    "llama": {"attention_bias": True, "mlp_bias": True},
    "qwen2": {"use_sliding_window": False},
    "gemma3_text": {"layer_types": ["sliding_attention"], "sliding_window": 4},
}

# HF config dicts that together build every parameter a family can have.
VARIANTS: dict[str, list[dict]] = {
    "bert": [
        {
            "model_type": model_type,
            "vocab_size": 50,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 40,
            "type_vocab_size": 2,
        }
        for model_type in ("bert", "xlm-roberta")
    ],
    "t5": [
        {"model_type": "t5", "vocab_size": 50, **TINY_T5},
        {"model_type": "mt5", "vocab_size": 50, **TINY_T5_V11},
    ],
    "decoder": [{"model_type": t, **_DECODER, **_DECODER_EXTRA.get(t, {})} for t in DECODER_TYPES],
}


def _model(hf: dict, *, with_lora: bool = False) -> BiEncoder:
    """The BiEncoder (with a projection) of ``hf``, abstract (shapes only)."""

    def build():
        config = registry.config_from_hf(hf)
        model = BiEncoder(config, projection_dim=8, rngs=nnx.Rngs(0))
        if with_lora:
            lora.inject(model, lora.LoRAConfig(rank=4), rngs=nnx.Rngs(1))
        return model

    return nnx.eval_shape(build)


def _params(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): tuple(v.shape) for path, v in flat}


def undeclared(family: registry.Family, model: nnx.Module) -> list[str]:
    """Parameters of ``model`` whose logical axes ``family`` (or the BiEncoder's head) does not
    declare, or declares with the wrong rank."""
    table = {**registry.HEAD_LOGICAL_AXES, **family.logical_axes}
    bad = []
    for path, shape in _params(model).items():
        axes = table.get("/".join(path.split("/")[-2:]))
        if axes is None or len(axes) != len(shape):
            bad.append(f"{path} {shape}: declared {axes}")
    return bad


def missing_lora_targets(family: registry.Family, model: nnx.Module) -> list[str]:
    """Projections inside a block (a kernel split by heads or mlp) that ``family`` does not name
    as LoRA targets."""
    targets = set(family.lora_targets.values())
    bad = []
    for path, module in nnx.iter_modules(model.encoder):
        if isinstance(module, nnx.Linear) and str(path[-1]) not in targets:
            axes = family.logical_axes.get(f"{path[-1]}/kernel", ())
            if {"heads", "mlp"} & set(axes):
                bad.append("/".join(map(str, path)))
    return bad


def test_every_family_has_test_variants():
    assert {f.name for f in registry.FAMILIES} == set(VARIANTS), (
        "a registered family without VARIANTS here is not checked: add its configs"
    )
    for family in registry.FAMILIES:
        types = {registry.config_from_hf(hf).model_type for hf in VARIANTS[family.name]}
        assert types <= set(family.model_types)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_parameter_of_every_family_has_logical_axes(name):
    family = next(f for f in registry.FAMILIES if f.name == name)
    used = set()
    for hf in VARIANTS[name]:
        model = _model(hf)
        assert not undeclared(family, model), f"{hf['model_type']}: {undeclared(family, model)}"
        used |= {"/".join(p.split("/")[-2:]) for p in _params(model)}
    assert not set(family.logical_axes) - used, "entries no variant builds (stale or untested)"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_block_projection_is_a_lora_target(name):
    family = next(f for f in registry.FAMILIES if f.name == name)
    assert set(family.lora_targets) <= set(lora_layer.LORA_ROLES)
    names = set()
    for hf in VARIANTS[name]:
        model = _model(hf)
        assert not missing_lora_targets(family, model), missing_lora_targets(family, model)
        names |= {str(p[-1]) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)}
    assert set(family.lora_targets.values()) <= names, "a target no variant builds"


def test_a_family_missing_an_entry_or_a_target_is_refused():
    """The checks above can fail: one declaration dropped is reported by its parameter name."""
    bert = next(f for f in registry.FAMILIES if f.name == "bert")
    model = _model(VARIANTS["bert"][0])
    axes = {k: v for k, v in bert.logical_axes.items() if k != "value/kernel"}
    report = undeclared(dataclasses.replace(bert, logical_axes=axes), model)
    assert report and all("/value/kernel" in line for line in report)
    targets = {k: v for k, v in bert.lora_targets.items() if k != "mlp_down"}
    report = missing_lora_targets(dataclasses.replace(bert, lora_targets=targets), model)
    assert report == ["layers/0/output"]


# -------------------------------------------------------------------- the expected shardings
# Written from the rule table, independently of sharding.py: the logical axes of each kind of
# parameter by a regex on its path, then the mesh axis each mode puts on them.
EXPECTED_AXES = (
    (r"lora_a$", "LORA_A"),
    (r"lora_b$", "LORA_B"),
    (r"(word_embeddings|embed_tokens)/embedding$", ("vocab", "embed")),
    (r"(position|token_type)_embeddings/embedding$", (None, "embed")),
    (r"relative_attention_bias/embedding$", (None, "heads")),
    (r"/(query|key|value|q_proj|k_proj|v_proj)/kernel$", ("embed", "heads")),
    (r"/(query|key|value|q_proj|k_proj|v_proj)/bias$", ("heads",)),
    (r"/(attention_output|o_proj)/kernel$", ("heads", "embed")),
    (r"/(intermediate|gate|gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"/(intermediate|gate_proj|up_proj)/bias$", ("mlp",)),
    (r"/(output|down_proj)/kernel$", ("mlp", "embed")),
    (r"/lm_head/kernel$", ("embed", "vocab")),
)
TP_AXES = {"heads", "mlp", "vocab"}


def _expected_axes(path: str, ndim: int):
    for pattern, axes in EXPECTED_AXES:
        if re.search(pattern, path):
            if axes in ("LORA_A", "LORA_B"):
                kernel = _expected_axes(path.rsplit("/", 1)[0] + "/kernel", 2)
                return (kernel[0], None) if axes == "LORA_A" else (None, kernel[1])
            return axes
    return (None,) * ndim  # norms, the output biases, the projection: nothing named to split


def _expected_spec(path, shape, mode, data, model):
    spec = [None] * len(shape)
    if mode == "fsdp_tp" and model > 1:
        for i, axis in enumerate(_expected_axes(path, len(shape))):
            if axis in TP_AXES and shape[i] % model == 0:
                spec[i] = "model"
    if mode != "replicate" and len(shape) >= 2 and data > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % data == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "data"
    return PartitionSpec(*spec)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_derived_shardings_equal_the_rule_table(name):
    meshes = ({"data": 2, "model": 2}, {"data": 4, "model": 2}, {"data": 8, "model": 1})
    for hf in VARIANTS[name]:
        for with_lora in (False, True):
            params = _params(_model(hf, with_lora=with_lora))
            for mesh_shape in meshes:
                for mode in shd.SHARDING_MODES:
                    for path, shape in params.items():
                        for full in (f"params/{path}", f"opt_state/1/0/mu/{path}"):
                            got = shd.leaf_spec(full, shape, mesh_shape, mode)
                            want = _expected_spec(full, shape, mode, *mesh_shape.values())
                            assert got == want, (full, shape, mesh_shape, mode)


def test_state_shardings_reads_the_family_on_a_real_mesh():
    """One family through ``state_shardings`` on the 8 fake devices: the heads split over
    "model" and the vocabulary over "data" (FSDP), as the table says."""
    mesh = shd.make_mesh(data=4, model=2)
    params = {
        "encoder": {
            "layers": {0: {"q_proj": {"kernel": jax.ShapeDtypeStruct((32, 32), "float32")}}},
            "embed_tokens": {"embedding": jax.ShapeDtypeStruct((96, 32), "float32")},
        }
    }
    got = shd.state_shardings({"params": params}, mesh, "fsdp_tp")["params"]["encoder"]
    assert got["layers"][0]["q_proj"]["kernel"].spec == PartitionSpec("data", "model")
    assert got["embed_tokens"]["embedding"].spec == PartitionSpec("model", "data")
