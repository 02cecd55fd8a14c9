"""INSTRUCTOR: instruction-finetuned embeddings (Su et al., 2023, "One Embedder, Any Task").

A GTR checkpoint (T5 encoder, mean pooling, Dense) fine-tuned on MEDI (330 tasks), every text
prefixed by an instruction that names its domain, text type and objective ("Represent the
Medicine sentence for retrieving a duplicate sentence: ..."), the instruction's tokens left out
of pooling, one task per batch, and the release's loss (gte_jax/losses.py, ``instructor``): a
cross-entropy of each query over [its positive, every hard negative of the batch] plus one of
each positive over [its query, the other queries]. ``--config.loss.name=infonce`` trains ours
instead: one-direction InfoNCE over every positive and negative of the batch.

    gte-jax train --config configs/instructor.py --workdir runs/instructor \
        --config.model.init_from=/path/to/gtr-t5-large \
        --config.data.sources='[{"name": "medi", "path": "medi-data.json", "format": "medi"}]'
    gte-jax encode --model runs/instructor --input q.txt --output q.npy \
        --instruction "Represent the Wikipedia question for retrieving supporting documents: "

MEDI records carry their own instructions (``format: "medi"``: one source per task). A source of
your own names its tasks and gets the paper's template, e.g. ``{"path": "pairs.jsonl",
"query_instruction": "Medicine sentence for retrieving a duplicate sentence",
"doc_instruction": "Medicine sentence for retrieval", "instruction_template": "instructor"}``
(gte_jax/prompts.py). The export's ``config_sentence_transformers.json`` carries such sources'
prompts, and ``include_prompt: false`` in its Pooling module, so ``SentenceTransformer(export)
.encode(x, prompt=instruction)`` embeds as training did. Labels: "paper" = Su et al., 2023;
"release" = the authors' code (train.py of xlang-ai/instructor-embedding, and HF's
Seq2SeqTrainer defaults it runs with) and the training command of its README; "ours" = neither
gives the value.

``configs/instructor.py:runlocal`` trains on a CPU in about 10 s: the MEDI-format test fixture
(3 tasks) plus one source with instruction templates, from a tiny random GTR-shaped model (T5 v1.1
encoder, mean pooling, Dense without bias, Normalize; transformers' T5Tokenizer over a Unigram
vocabulary). gte-jax never downloads: the config builds it offline, once, in a few seconds
(gte_jax/models/tiny_gtr.py, cached under $GTE_JAX_CACHE or ~/.cache/gte-jax).
"""

from __future__ import annotations

import pathlib

from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.defaults import stage_config
from gte_jax.models import tiny_gtr

REPO = pathlib.Path(__file__).resolve().parent.parent
MEDI_FIXTURE = REPO / "tests" / "fixtures" / "medi" / "medi-data.json"


def get_config(arg: str | None = None):
    c = stage_config("instructor")
    c.model.init_from = ""  # a GTR directory (gtr-t5-large in the paper)
    c.model.dtype = "bfloat16"  # ours: TPU/GPU; on CPU use float32
    # paper §2 and release (instruction_mask): instruction tokens are not pooled
    c.model.include_prompt = "false"
    c.model.remat = True  # ours: 512-token texts

    # MEDI (release: medi-data.json); its records carry their own instructions.
    c.data.sources = [{"name": "medi", "path": "medi-data.json", "format": "medi"}]
    c.data.mixed_batches = False  # paper §3, release: one task per batch
    # release: the per-task batches are shuffled together, so tasks come in proportion to size
    c.data.alpha = 1.0
    c.data.query_max_length = 512  # release: --max_source_length 512
    c.data.doc_max_length = 512
    c.data.packing = True  # ours: several texts per row; pool masks move with their tokens

    c.loss.name = "instructor"  # release: InstructorTrainer.compute_loss (ours: "infonce")
    c.loss.temperature = 0.1  # release: README's --cl_temperature 0.1 (0.01 until 2023-09)

    c.train.batch_size = 32  # ours (release: Trainer's default, 8 per GPU)
    c.train.epochs = 10.0  # release: --num_train_epochs 10
    c.train.num_steps = 0
    c.train.learning_rate = 2e-5  # release
    c.train.warmup_ratio = 0.1  # release
    c.train.schedule = "linear"  # release: Trainer's default
    # AdamW as HF's Trainer runs it (no train_config / command line sets these):
    c.train.weight_decay = 0.0  # release: Trainer's default (stage_config: 0.01)
    c.train.adam_eps = 1e-8  # release: Trainer's default (stage_config: 1e-6)
    c.train.adam_b1 = 0.9  # release: Trainer's default
    c.train.adam_b2 = 0.999  # release: Trainer's default
    c.train.max_grad_norm = 1.0  # release: Trainer's default
    c.checkpoint.every_steps = 500  # release: --save_steps 500

    if arg == "runlocal":  # big_vision's switch: the same recipe, shrunk for a laptop
        # GTR's layout at toy size, random weights, built here once (no download, no torch)
        c.model.init_from = str(tiny_gtr.cached_tiny_gtr())
        c.model.dtype = "float32"
        c.model.remat = False
        c.data.sources = [
            {"name": "medi", "path": str(MEDI_FIXTURE), "format": "medi"},
            {
                "name": "bible",
                "path": str(DEMO_DIR / "bible_finetune.jsonl"),
                "query_instruction": "Bible verse for retrieving its modern translation",
                "doc_instruction": "modern Bible translation for retrieval",
                "instruction_template": "instructor",
            },
        ]
        c.data.query_max_length = 64
        c.data.doc_max_length = 64
        c.train.batch_size = 8
        c.train.num_steps = 6
        c.train.epochs = 0.0
        c.train.learning_rate = 1e-4
        c.train.warmup_ratio = 0.0
        c.train.progress_bar = False
        c.checkpoint.every_steps = 3
    return c
