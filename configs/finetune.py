"""Fine-tune a model on your own pair files.

    gte-jax train --config configs/finetune.py --workdir runs/my_ft \
        --config.model.init_from=/path/to/hf_model \
        --config.data.train_files=a.jsonl,b.jsonl --config.train.epochs=1

Each JSONL line: {"query": ..., "positive": ..., "negatives": [...]} ("negatives" optional; a
single "negative" string is accepted too). Each file is one source, named by its file stem; with
several files, every batch comes from one file, files drawn with p ∝ n^data.alpha.
"""

from __future__ import annotations

from gte_jax.defaults import stage_config


def get_config():
    c = stage_config("finetune")
    c.model.init_from = "all-MiniLM-L6-v2"
    # bf16 matmuls (f32 accumulation, f32 parameters and export) on TPU / GPU / CPUs with AMX-BF16
    # or AVX-512 BF16, float32 elsewhere (gte_jax/models/precision.py). --config.model.dtype=float32 to pin it.
    c.model.dtype = "auto"
    c.data.train_files = ""  # comma-separated JSONL files (required)
    c.data.max_length = 0  # > 0: one token budget for queries and documents (else the two below)
    c.data.query_max_length = 64
    c.data.doc_max_length = 256
    c.data.alpha = 0.5
    # Several texts per row, block-diagonal attention: ~1.15 processed tokens per real one against
    # ~1.97 when each batch is padded to its longest text (benchmarks/README.md). Works with
    # GradCache chunks too (rows dealt to the chunks by token budget).
    c.data.packing = True
    # Rows per device and role are fixed at start-up from the first 16 batches (one compiled
    # train step, data.packing_estimate_batches), so no rounding is needed.
    c.data.packing_row_multiple = 1
    c.train.batch_size = 64
    c.train.learning_rate = 2e-5
    c.train.epochs = 1.0
    c.train.num_steps = 0
    c.train.warmup_ratio = 0.1
    c.train.seed = 0
    c.loss.name = "infonce"  # sentence-transformers' MultipleNegativesRankingLoss
    c.loss.temperature = 0.05  # = MNRL's scale 20
    c.checkpoint.every_steps = 500
    return c
