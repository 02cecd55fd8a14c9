"""Tiny random decoder LLMs, built offline in seconds: the starting point of the decoder recipes'
``:runlocal`` variants (configs/llm2vec.py), as :mod:`gte_jax.models.tiny_gtr` is for T5.

A real family's layout at toy size (Llama / Mistral / Qwen2 / Qwen3 / Gemma3 text): the HF config
comes from transformers' own config class (every field a real checkpoint's config.json has), our
own decoder tower initialises the weights (no torch), and :func:`gte_jax.hf.export_pretrained`
(the writer every export goes through) writes a ``*ForCausalLM`` directory — LM head included
(Gemma3: tied to the embeddings, as in Gemma) — with sentence-transformers files (mean pooling,
Normalize). The tokenizer is a byte-level BPE trained in a second with the ``tokenizers`` library
on the bundled demo text: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, BOS prepended to every text (as
Gemma's and Llama's tokenizers do); every byte is a token, so LLM2Vec's mask token ``"_"``
exists. Causal attention, as the real checkpoints: a recipe switches it (``model.attention``).

:func:`tiny_decoder_dir` builds it once per (cache dir, family, architecture, pooling, seed) and
reuses it; the directory is written next to its final place and renamed, so a half-written
model is never seen. Deterministic: the same arguments give the same weights and vocabulary.
"""

from __future__ import annotations

import pathlib
from typing import Any

from gte_jax.models.tiny_gtr import cached_build, demo_lines

# family (HF model_type) -> transformers config class.
CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma3_text": "Gemma3TextConfig",
}
TINY_DECODER_VOCAB = 512
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2
# Small enough to train on a CPU in seconds, big enough for GQA (4 query heads on 2 kv heads).
TINY_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}
# What each family has that the others lack, at toy size (windows short enough to bite).
FAMILY_EXTRAS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"tie_word_embeddings": False, "sliding_window": 32},
    "qwen2": {"tie_word_embeddings": False, "use_sliding_window": False},
    "qwen3": {"tie_word_embeddings": False},
    "gemma3_text": {
        "tie_word_embeddings": True,
        "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention"],
        "query_pre_attn_scalar": 16,
        "use_bidirectional_attention": False,
    },
}


def tiny_decoder_tokenizer(vocab_size: int = TINY_DECODER_VOCAB, max_length: int = 512) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` (<pad> 0, <eos> 1, <bos> 2, BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pad, eos, bos = SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_lines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos,
        model_max_length=max_length,
    )  # fmt: skip


def _hf_config(family: str, tokenizer: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    import transformers

    if family not in CONFIG_CLASSES:
        raise ValueError(f"unknown decoder family {family!r}; use one of {sorted(CONFIG_CLASSES)}")
    fields = {**TINY_DECODER, **FAMILY_EXTRAS[family], "vocab_size": len(tokenizer)}
    fields.update(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    fields.update(overrides)
    hf_config = getattr(transformers, CONFIG_CLASSES[family])(**fields).to_dict()
    hf_config["architectures"] = [_causal_lm_class(family)]
    return hf_config


def _causal_lm_class(family: str) -> str:
    from gte_jax.models.decoder import ARCHITECTURES

    return ARCHITECTURES[family][1]


def build_tiny_decoder(
    out_dir: str | pathlib.Path,
    family: str = "gemma3_text",
    *,
    pooling: str = "mean",
    seed: int = 0,
    **overrides: Any,
) -> pathlib.Path:
    """Writes a random tiny ``family`` causal LM (HF config fields ``overrides`` win) with its
    tokenizer and sentence-transformers files (``pooling``, Normalize) to ``out_dir``."""
    from flax import nnx

    from gte_jax import hf
    from gte_jax.models.decoder import DecoderConfig
    from gte_jax.models.encoder import BiEncoder

    tokenizer = tiny_decoder_tokenizer()
    hf_config = _hf_config(family, tokenizer, overrides)
    model = BiEncoder(
        DecoderConfig.from_hf(hf_config), pooling=pooling, normalize=True, rngs=nnx.Rngs(seed)
    )
    card = {
        "model_name": f"tiny-{family}",
        "description": f"A random tiny {family} causal LM (seed {seed}) for offline runs.",
    }
    info = hf.PretrainedInfo(source="gte_jax.models.tiny_decoder", hf_config=hf_config)
    return pathlib.Path(hf.export_pretrained(model, tokenizer, out_dir, card=card, info=info))


def tiny_decoder_dir(
    family: str = "gemma3_text", *, pooling: str = "mean", seed: int = 0, **overrides: Any
) -> pathlib.Path:
    """The tiny ``family`` model of these settings under :func:`cache_dir`, built on first use."""
    spec = [family, TINY_DECODER, FAMILY_EXTRAS.get(family), TINY_DECODER_VOCAB, pooling, overrides]
    return cached_build(
        f"tiny-{family}",
        spec,
        seed,
        lambda tmp: build_tiny_decoder(tmp, family, pooling=pooling, seed=seed, **overrides),
    )
