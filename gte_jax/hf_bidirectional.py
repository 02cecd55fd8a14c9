"""Bidirectional Llama / Mistral / Qwen2 / Qwen3 exports that no loader can run causal by mistake.

transformers' ``LlamaModel``, ``MistralModel``, ``Qwen2Model`` and ``Qwen3Model`` hard-code causal
attention (``is_causal = True``, a causal mask), so a plain ``model_type: qwen2`` export of a model
trained bidirectionally would load everywhere and embed wrongly, silently. Such an export is
written instead under a ``model_type`` of ours that plain transformers does not know
(``gte_jax_bidirectional_<family>``), with an ``auto_map`` pointing at a modeling file written into
the export (:data:`MODULE`): the family's own model class with every attention non-causal and a
bidirectional mask (padding only; on sliding layers the window ``|i - j| <= w // 2``, gte-jax's rule
in ``gte_jax.models.decoder``). ``SentenceTransformer(export, trust_remote_code=True)`` and
``AutoModel.from_pretrained(export, trust_remote_code=True)`` run that file; without
``trust_remote_code`` transformers raises instead of returning causal embeddings. Gemma3 has its
own switch (``use_bidirectional_attention``) and causal models stay plain.

gte-jax itself never runs the shipped file: it recognises its own export by the config alone
(:func:`is_own_export`: our model_type, exactly our ``auto_map``, ``gte_jax_attention:
bidirectional``) and reads it as the plain family config (:func:`plain_config`).
"""

from __future__ import annotations

from typing import Any

from gte_jax.models.decoder import ARCHITECTURES, ATTENTION_KEY

# HF model_type -> transformers' class-name stem (LlamaConfig, LlamaModel, ...).
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
MODULE = "modeling_gte_jax_bidirectional"
MODEL_TYPE_PREFIX = "gte_jax_bidirectional_"
# The family's own architectures entry, kept so that a read-back knows the checkpoint's layout.
BASE_ARCHITECTURES_KEY = "gte_jax_base_architectures"

_SOURCE = '''"""{stem} with bidirectional attention, written by gte-jax (gte_jax/hf_bidirectional.py).

Load with trust_remote_code=True (AutoModel, SentenceTransformer). transformers' {stem}Model hard-
codes causal attention; this subclass makes every attention non-causal and gives it a
bidirectional mask: padding only, and on sliding-window layers |i - j| <= sliding_window // 2.
"""

from transformers import {stem}Config, {stem}Model
from transformers.masking_utils import (
    create_bidirectional_mask,
    sliding_window_bidirectional_overlay,
)


class {prefix}Config({stem}Config):
    model_type = "{model_type}"


class {prefix}Model({stem}Model):
    config_class = {prefix}Config

    def __init__(self, config):
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def _layer_types(self):
        types = getattr(self.config, "layer_types", None)
        if types and hasattr(self, "has_sliding_layers"):  # Qwen2 / Qwen3: per layer
            return list(types[: self.config.num_hidden_layers])
        # Llama: no window; Mistral: every layer slides when sliding_window is set.
        window = getattr(self.config, "sliding_window", None) if "{family}" == "mistral" else None
        kind = "sliding_attention" if window is not None else "full_attention"
        return [kind] * self.config.num_hidden_layers

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        masks = {{}}
        for kind in set(self._layer_types()):
            window = self.config.sliding_window if kind == "sliding_attention" else None
            masks[kind] = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                and_mask_function=(
                    None if window is None else sliding_window_bidirectional_overlay(window // 2)
                ),
                allow_is_bidirectional_skip=False,  # None would read as "causal" further down
            )
        if hasattr(self, "has_sliding_layers"):
            mask = masks
        else:
            (mask,) = masks.values()
        return super().forward(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)
'''


def needs_remote_code(hf_config: dict[str, Any]) -> bool:
    """A config (as gte-jax exports it) that transformers' own class would run causal."""
    return (
        hf_config.get("model_type") in FAMILIES and hf_config.get(ATTENTION_KEY) == "bidirectional"
    )


def _names(family: str) -> tuple[str, str, str]:
    """(model_type, class-name prefix, transformers stem) of our class for ``family``."""
    stem = FAMILIES[family]
    return MODEL_TYPE_PREFIX + family, f"GteJaxBidirectional{stem}", stem


def auto_map(family: str) -> dict[str, str]:
    _, prefix, _ = _names(family)
    return {"AutoConfig": f"{MODULE}.{prefix}Config", "AutoModel": f"{MODULE}.{prefix}Model"}


def export_config(hf_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(config.json dict, {file name: text}) of a bidirectional export of ``hf_config``."""
    family = hf_config["model_type"]
    model_type, prefix, stem = _names(family)
    out = dict(hf_config)
    out[BASE_ARCHITECTURES_KEY] = list(hf_config.get("architectures") or [ARCHITECTURES[family][0]])
    out.update(model_type=model_type, architectures=[f"{prefix}Model"], auto_map=auto_map(family))
    source = _SOURCE.format(stem=stem, prefix=prefix, model_type=model_type, family=family)
    return out, {f"{MODULE}.py": source}


def is_own_export(hf_config: dict[str, Any]) -> bool:
    """True for a config :func:`export_config` wrote (decided on the config, no code is run)."""
    model_type = str(hf_config.get("model_type", ""))
    family = (
        model_type[len(MODEL_TYPE_PREFIX) :] if model_type.startswith(MODEL_TYPE_PREFIX) else ""
    )
    return (
        family in FAMILIES
        and hf_config.get("auto_map") == auto_map(family)
        and hf_config.get(ATTENTION_KEY) == "bidirectional"
    )


def plain_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The family's own config dict of one of our exports (others are returned unchanged)."""
    if not is_own_export(hf_config):
        return hf_config
    out = {k: v for k, v in hf_config.items() if k not in ("auto_map", BASE_ARCHITECTURES_KEY)}
    out["model_type"] = hf_config["model_type"][len(MODEL_TYPE_PREFIX) :]
    out["architectures"] = list(hf_config.get(BASE_ARCHITECTURES_KEY) or [])
    return out
