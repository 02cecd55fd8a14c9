"""A tiny random GTR-shaped model, built offline in seconds: the starting point of recipes'
``:runlocal`` variants that fine-tune a T5 encoder (configs/instructor.py).

GTR (and INSTRUCTOR, which fine-tunes it) is a sentence-transformers directory: a T5 v1.1
``T5EncoderModel`` + mean Pooling + a Dense projection without bias + Normalize. The tiny one has
the same layout at toy size: our own T5 tower initialised as HF initialises T5, exported with
:func:`gte_jax.hf.export_pretrained` (the writer every export goes through), and transformers'
own ``T5Tokenizer`` class (WhitespaceSplit + Metaspace pre-tokenizer, ``</s>`` appended: the
tokenizer.json every T5 checkpoint ships) over a Unigram vocabulary trained in a second with the
``tokenizers`` library on the bundled demo text. No torch, no download.

:func:`cached_tiny_gtr` builds it once per (cache dir, architecture, seed) and reuses it; the directory is
written next to its final place and renamed, so a half-written model is never seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

# Toy T5 v1.1 (gated GELU, untied head irrelevant to the encoder); T5's own bucket settings.
TINY_GTR_T5 = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.1,
    "n_positions": 512,
}
TINY_GTR_PROJECTION_DIM = 48  # GTR: Dense d_model -> 768, no bias
TINY_GTR_VOCAB = 1000
# T5's special tokens, in T5's order: <pad> = 0, </s> = 1, <unk> = 2.
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def demo_lines(limit: int = 3000) -> list[str]:
    """Up to ``limit`` texts of the bundled demo files (what the tiny tokenizers train on)."""
    from gte_jax.data.pipeline import DEMO_DIR

    lines: list[str] = []
    for path in sorted(DEMO_DIR.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                lines += [v for v in record.values() if isinstance(v, str)]
                if len(lines) >= limit:
                    return lines
    return lines


def tiny_t5_tokenizer(vocab_size: int = TINY_GTR_VOCAB) -> Any:
    """transformers' ``T5Tokenizer`` over a Unigram vocabulary trained on the demo text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(  # T5's (T5Tokenizer sets the same)
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(T5_SPECIAL_TOKENS),
        unk_token="<unk>",
        show_progress=False,
    )
    trainer_tok.train_from_iterator(demo_lines(), trainer)
    vocab = [tuple(piece) for piece in json.loads(trainer_tok.to_str())["model"]["vocab"]]
    if [p for p, _ in vocab[:3]] != list(T5_SPECIAL_TOKENS):
        raise RuntimeError(f"Unigram vocabulary does not start with {T5_SPECIAL_TOKENS}")
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TINY_GTR_T5["n_positions"])


def build_tiny_gtr(out_dir: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Writes a random tiny GTR (T5 v1.1 + mean Pooling + Dense without bias + Normalize, and
    its T5 tokenizer) to ``out_dir``, as sentence-transformers and transformers load it."""
    from flax import nnx
    from transformers import T5Config

    from gte_jax import hf
    from gte_jax.models.encoder import BiEncoder
    from gte_jax.models.t5 import T5EncoderConfig

    tokenizer = tiny_t5_tokenizer()
    fields = dict(TINY_GTR_T5, vocab_size=len(tokenizer), pad_token_id=0)
    hf_config = T5Config(**fields, eos_token_id=1, decoder_start_token_id=0).to_dict()
    model = BiEncoder(
        T5EncoderConfig.from_hf(hf_config),
        pooling="mean",
        normalize=True,
        projection_dim=TINY_GTR_PROJECTION_DIM,
        projection_bias=False,
        rngs=nnx.Rngs(seed),
    )
    card = {
        "model_name": "tiny-gtr-t5",
        "description": f"A random tiny GTR-shaped model (seed {seed}) for offline runs.",
    }
    info = hf.PretrainedInfo(source="gte_jax.models.tiny_gtr", hf_config=hf_config)
    return pathlib.Path(hf.export_pretrained(model, tokenizer, out_dir, card=card, info=info))


def cache_dir() -> pathlib.Path:
    """``$GTE_JAX_CACHE``, else ``$XDG_CACHE_HOME/gte-jax``, else ``~/.cache/gte-jax``."""
    if os.environ.get("GTE_JAX_CACHE"):
        return pathlib.Path(os.environ["GTE_JAX_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(xdg) / "gte-jax"


def cached_build(prefix: str, spec: Any, seed: int, build: Any) -> pathlib.Path:
    """``<cache_dir>/<prefix>-<digest of spec>-seed<seed>``, written by ``build(tmp_dir) -> dir``
    on first use. The digest of the settings in the name means a changed architecture never
    reuses a stale copy; the directory is built beside its final place and renamed, so a
    half-written model is never seen (another process finishing first keeps its copy)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    out = cache_dir() / f"{prefix}-{digest}-seed{seed}"
    if (out / "modules.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        built = build(pathlib.Path(tmp) / "model")
        try:
            built.rename(out)
        except OSError:
            if not (out / "modules.json").exists():
                raise
    return out


def cached_tiny_gtr(*, seed: int = 0) -> pathlib.Path:
    """The tiny GTR of ``seed`` under :func:`cache_dir`, built on first use."""
    spec = [TINY_GTR_T5, TINY_GTR_PROJECTION_DIM, TINY_GTR_VOCAB]
    return cached_build("tiny-gtr-t5", spec, seed, lambda tmp: build_tiny_gtr(tmp, seed=seed))
