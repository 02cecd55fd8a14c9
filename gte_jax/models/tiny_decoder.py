"""Tiny random decoder LLMs, built offline in seconds: the starting point of the decoder recipes'
``:runlocal`` variants (configs/e5_mistral.py, configs/gte_qwen2.py).

A 7B embedder's layout at toy size: transformers' own config class of the family (``MistralConfig``,
``Qwen2Config``, ...) gives the HF ``config.json``, our decoder tower is initialised as HF
initialises it (normal 0.02) and written by :func:`gte_jax.hf.export_pretrained` (the writer every
export goes through: safetensors with torch names, plus sentence-transformers' last-token Pooling and
Normalize), with a byte-level BPE tokenizer trained in a second with the ``tokenizers`` library on
the bundled demo text (``<pad>`` / ``<eos>`` / ``<bos>``; no post-processor: ``model.append_eos``
decides the EOS). No torch, no download.

:func:`tiny_decoder_dir` builds one per (cache dir, family, overrides, seed) and reuses it; the
directory is written next to its final place and renamed, so a half-written model is never seen.
Deterministic: the same arguments give the same bytes (the tokenizer's trainer and the weights'
seed are fixed).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

from gte_jax.models.tiny_gtr import cache_dir

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
TINY_DECODER_VOCAB = 384

# family (HF model_type) -> (transformers' config class, the checkpoints' architecture).
TINY_DECODER_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
# GQA (4 query heads on 2 kv heads), an untied LM head as the 7B checkpoints have; compiles in
# seconds.
TINY_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
_FAMILY_FIELDS = {
    "mistral": {"sliding_window": None},  # Mistral-7B-v0.1 has 4096; moot at toy lengths
    "qwen2": {"use_sliding_window": False},
    "gemma3_text": {"tie_word_embeddings": True, "query_pre_attn_scalar": 8},
}


def _demo_lines(limit: int = 400) -> list[str]:
    from gte_jax.data.pipeline import DEMO_DIR

    lines: list[str] = []
    for name in ("chat_qa.jsonl", "news_lead_body.jsonl"):
        with (DEMO_DIR / name).open(encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                lines += [record["query"], record["positive"]]
                if len(lines) >= limit:
                    return lines[:limit]
    return lines


def tiny_decoder_tokenizer(vocab_size: int = TINY_DECODER_VOCAB) -> Any:
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on the demo text, pad/eos/bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_demo_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        model_max_length=TINY_DECODER["max_position_embeddings"],
    )


def tiny_hf_config(family: str, tokenizer: Any, **overrides: Any) -> dict[str, Any]:
    """The family's ``config.json`` at toy size, as transformers' config class writes it."""
    import transformers

    if family not in TINY_DECODER_FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {sorted(TINY_DECODER_FAMILIES)}")
    fields = {**TINY_DECODER, **_FAMILY_FIELDS.get(family, {}), **overrides}
    fields.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config_class, architecture = TINY_DECODER_FAMILIES[family]
    # *ForCausalLM as the published checkpoints: an LM head (untied but Gemma's) comes along.
    return getattr(transformers, config_class)(**fields, architectures=[architecture]).to_dict()


def build_tiny_decoder(
    out_dir: str | os.PathLike, family: str, *, seed: int = 0, **overrides: Any
) -> pathlib.Path:
    """Writes a random tiny ``family`` decoder (last-token pooling, normalised) and its tokenizer
    to ``out_dir``, as transformers and sentence-transformers load it."""
    from flax import nnx

    from gte_jax import hf
    from gte_jax.models import registry
    from gte_jax.models.encoder import BiEncoder

    tokenizer = tiny_decoder_tokenizer()
    hf_config = tiny_hf_config(family, tokenizer, **overrides)
    config = registry.family_for(family).config_from_hf(hf_config)
    model = BiEncoder(config, pooling="last", normalize=True, rngs=nnx.Rngs(seed))
    card = {
        "model_name": f"tiny-{family}",
        "description": f"A random tiny {family} decoder (seed {seed}) for offline runs.",
    }
    info = hf.PretrainedInfo(source="gte_jax.models.tiny_decoder", hf_config=hf_config)
    return pathlib.Path(hf.export_pretrained(model, tokenizer, out_dir, card=card, info=info))


def tiny_decoder_dir(family: str, *, seed: int = 0, **overrides: Any) -> pathlib.Path:
    """The tiny ``family`` decoder of (``overrides``, ``seed``) under ``cache_dir()``, built on
    first use."""
    spec = [family, TINY_DECODER, _FAMILY_FIELDS.get(family), overrides, TINY_DECODER_VOCAB]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    out = cache_dir() / f"tiny-{family}-{digest}-seed{seed}"
    if (out / "modules.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        built = build_tiny_decoder(pathlib.Path(tmp) / "model", family, seed=seed, **overrides)
        try:
            built.rename(out)
        except OSError:  # another process finished first: keep its copy
            if not (out / "modules.json").exists():
                raise
    return out
