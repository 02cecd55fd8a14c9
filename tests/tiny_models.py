"""Tiny real-architecture models built offline for tests: transformers' own config classes, random
torch weights, ``save_pretrained`` into a temporary directory, and a tokenizer trained in a second
with the ``tokenizers`` library on the bundled demo text."""

from __future__ import annotations

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
