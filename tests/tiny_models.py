"""Tiny real-architecture decoders for tests, built offline in about a second.

``tiny_decoder_dir(tmp_path, family, **config_overrides)`` saves a randomly initialised
transformers model (its own config class, torch random weights, ``save_pretrained``) with a
byte-level BPE tokenizer trained on the bundled text (``tokenizers``), wrapped in
``PreTrainedTokenizerFast`` with pad / eos tokens and a post-processor that appends EOS (what
last-token pooling recipes need). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
import pathlib

DATA = pathlib.Path("/work/shared/data")
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
