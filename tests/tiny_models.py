"""Tiny real-architecture models built offline for tests (BERT-free: T5 encoders and Llama /
Mistral / Qwen2 / Qwen3 / Gemma3 decoders): transformers' own config classes, random
torch weights, ``save_pretrained`` into a temporary directory, and a tokenizer trained in a second
with the ``tokenizers`` library on the bundled demo text."""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from gte_jax.data.pipeline import DEMO_DIR

TOKENIZER_TEXT = DEMO_DIR / "bible_kjv_web_ot.jsonl"

# T5 v1.0 (ReLU feed-forward); 8 buckets up to distance 20, so texts of a few dozen tokens reach
# every bucket, the log-spaced and the clipped ones included.
TINY_T5 = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 20,
    "feed_forward_proj": "relu",
    "dropout_rate": 0.1,
    "decoder_start_token_id": 0,
}
# T5 v1.1 / FLAN-T5 differ in the encoder by the gated-GELU feed-forward only (their untied LM
# head and unscaled decoder output are decoder-side); d_kv * heads != d_model as in T5-11B.
TINY_T5_V11 = {
    **TINY_T5,
    "feed_forward_proj": "gated-gelu",
    "d_kv": 6,
    "tie_word_embeddings": False,
}


def _training_lines(n: int = 400) -> list[str]:
    lines = []
    with TOKENIZER_TEXT.open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            lines += [record["query"], record["positive"]]
            if len(lines) >= n:
                break
    return lines


def tiny_t5_tokenizer(vocab_size: int = 400) -> Any:
    """A SentencePiece-style Unigram tokenizer as T5's: <pad> = 0, </s> = 1 (appended), <unk> = 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(_training_lines(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def tiny_t5_dir(
    tmp_path: pathlib.Path, *, model_class: str = "T5EncoderModel", seed: int = 0, **overrides
) -> pathlib.Path:
    """A random tiny T5 (``TINY_T5`` updated with ``overrides``) + its tokenizer, saved as
    transformers writes them. ``model_class``: T5EncoderModel (what sentence-transformers loads),
    T5Model or T5ForConditionalGeneration (full checkpoints, decoder included), MT5EncoderModel
    (model_type mt5)."""
    import torch
    import transformers

    tokenizer = tiny_t5_tokenizer()
    fields = {**TINY_T5, **overrides}
    fields.setdefault("vocab_size", len(tokenizer))
    torch.manual_seed(seed)
    config_class = (
        transformers.MT5Config if model_class.startswith("MT5") else transformers.T5Config
    )
    model = getattr(transformers, model_class)(config_class(**fields))
    out = pathlib.Path(tmp_path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------ decoders
# ``tiny_decoder_dir(tmp_path, family, **config_overrides)``: a randomly initialised transformers
# decoder with a byte-level BPE tokenizer (pad / eos, a post-processor appending EOS).

DATA = DEMO_DIR
PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
TOKENIZER_VOCAB = 384

# family -> (config class, plain model class, causal-LM class) in transformers.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaModel", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralModel", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2Model", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3Model", "Qwen3ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3TextModel", "Gemma3ForCausalLM"),
}

# Small enough to compile in seconds, big enough to have GQA (4 query heads on 2 kv heads).
_TINY = {
    "vocab_size": TOKENIZER_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
}
# Per-family extras that exercise what the family has (sliding windows short enough to bite).
_FAMILY_TINY = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"sliding_window": 5, "tie_word_embeddings": False},
    "qwen2": {"use_sliding_window": False, "tie_word_embeddings": False},
    "qwen3": {"tie_word_embeddings": False},
    "gemma3_text": {
        "sliding_window": 6,
        "layer_types": ["sliding_attention", "full_attention"],
        "query_pre_attn_scalar": 8,
    },
}


def text_lines(n: int = 400) -> list[str]:
    """The first ``n`` texts (queries and positives) of the bundled chat and news pairs."""
    lines: list[str] = []
    for name in ("chat_qa.jsonl", "news_lead_body.jsonl"):
        with open(DATA / name, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                lines += [record["query"], record["positive"]]
                if len(lines) >= n:
                    return lines[:n]
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text_lines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}",
        pair=f"$A {EOS} $B:1 {EOS}:1",
        special_tokens=[(EOS, tok.token_to_id(EOS))],
    )
    return tok.to_str()


def tiny_tokenizer():
    """A PreTrainedTokenizerFast (byte-level BPE, pad/eos, EOS appended) on the bundled text."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        model_max_length=_TINY["max_position_embeddings"],
    )


def tiny_config(family: str, **config_overrides):
    """transformers' own config class for ``family`` at tiny size (overrides win)."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {sorted(FAMILIES)}")
    tokenizer = tiny_tokenizer()
    kwargs = dict(_TINY, **_FAMILY_TINY[family])
    kwargs.update(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    kwargs.update(config_overrides)
    return getattr(transformers, FAMILIES[family][0])(**kwargs)


def tiny_torch_model(family: str, *, causal_lm: bool = True, seed: int = 0, **config_overrides):
    """The torch model (random weights, eval mode, float32, eager attention)."""
    import torch
    import transformers

    config = tiny_config(family, **config_overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][2 if causal_lm else 1])(config).eval()
    with torch.no_grad():  # norms start at their identity: random weights test them
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def tiny_decoder_dir(
    tmp_path: pathlib.Path,
    family: str,
    *,
    causal_lm: bool = True,
    max_shard_size: int | str | None = None,
    seed: int = 0,
    name: str | None = None,
    **config_overrides,
) -> pathlib.Path:
    """A saved tiny ``family`` model dir (``*ForCausalLM`` unless ``causal_lm=False``) with the
    tiny tokenizer; ``max_shard_size`` small enough gives a sharded checkpoint with an index."""
    model = tiny_torch_model(family, causal_lm=causal_lm, seed=seed, **config_overrides)
    out = pathlib.Path(tmp_path) / (name or f"{family}_{'lm' if causal_lm else 'base'}_{seed}")
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    tiny_tokenizer().save_pretrained(out)
    return out
