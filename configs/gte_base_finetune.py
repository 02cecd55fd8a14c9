"""GTE stage 2: supervised fine-tuning with hard negatives, starting from stage 1 (GTE-base recipe).

GTE §3–4: labeled pairs with mined hard negatives (MS MARCO, NQ, NLI, ...), batch 128, one hard
negative per query, sequence length 512, the same improved contrastive loss (τ = 0.01); negatives
join the document side of the q→d and d→d terms.

    gte-jax train --config configs/gte_base_finetune.py --workdir gs://BUCKET/gte_base/stage2 \
        --config.model.init_from=gs://BUCKET/gte_base/stage1     # stage 1 workdir or export
    gte-jax mine --model gs://BUCKET/gte_base/stage1 ...           # more hard negatives
"""

from __future__ import annotations

from gte_jax.defaults import stage_config


def get_config(arg: str | None = None):
    c = stage_config("finetune")
    c.model.init_from = ""  # stage 1's workdir (its newest checkpoint) or an exported directory
    c.model.dtype = "bfloat16"
    c.model.attention_dropout = 0.0  # ours: keeps the fused attention kernels on TPU/GPU

    c.data.data_dir = ""  # "" = TFDS default (~/tensorflow_datasets); gs:// works
    one_negative = {"num_negatives": 1}  # GTE §4.1: one hard negative per query
    c.data.sources = [
        {"name": "msmarco", "tfds": "msmarco_triples", **one_negative},
        {"name": "snli", "tfds": "nli_triplets/snli", **one_negative},
        {"name": "multinli", "tfds": "nli_triplets/multinli", **one_negative},
    ]
    c.data.alpha = 0.5
    c.data.query_max_length = 512  # GTE §4.1: 512 tokens in stage 2
    c.data.doc_max_length = 512
    # ours: several texts per row, so the step does ~no work on padding; with GradCache each
    # chunk packs whole texts up to its token budget (docs/design.md, "Packing with GradCache").
    c.data.packing = True
    # ours: no rounding of rows (and slots) per device and chunk: at stage-1 shapes a multiple of 8
    # pads 1.15x the real tokens, 1 pads 1.08x (benchmarks/packed_gradcache.py), for a few more
    # shapes to compile
    c.data.packing_row_multiple = 1

    c.loss.name = "gte"
    c.loss.temperature = 0.01

    c.train.batch_size = 128  # GTE §4.1
    c.train.num_steps = 4000  # ours
    c.train.learning_rate = 2e-5  # ours
    c.train.warmup_ratio = 0.1
    c.checkpoint.every_steps = 500
    return c
