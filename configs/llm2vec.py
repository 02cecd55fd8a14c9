"""LLM2Vec (BehnamGhader et al., 2024): a decoder LLM becomes a text encoder without labels.

    gte-jax train --config configs/llm2vec.py --workdir runs/llm2vec \
        --config.mntp.model.init_from=/path/to/gemma-3-1b-pt \
        --config.mntp.data.text_files=wiki.txt --config.simcse.data.text_files=wiki1m.txt

Three stages of the one loop, each starting from the one before (``model.init_from =
"stage:<name>"``; a LoRA stage's workdir loads as the merged model W + s·A·B, so every stage
trains a fresh LoRA on the merged weights of the last: the release's ``merge_peft=True``):

1. ``mntp``: bidirectional attention on, masked next-token prediction — 20 % of the tokens
   (never special ones) replaced BERT-style by ``"_"``, token i predicted from the output at
   i - 1 with the model's own LM head (gte_jax/data/mntp.py, train.mntp_value_and_grad). LoRA
   on every projection of the tower; the LM head stays frozen (below).
2. ``simcse``: unsupervised SimCSE — each text twice with independent attention-dropout masks
   (0.3), the two views a positive pair against the global batch, InfoNCE τ = 0.05, mean
   pooling.
3. ``supervised`` (``:supervised``, and in ``:runlocal``): contrastive fine-tuning on pairs
   with hard negatives (the paper: public E5 data). The release trains it on top of the MNTP
   model, not on SimCSE (``--config.supervised.model.init_from=stage:mntp`` does that); here
   it follows the previous stage. The release writes each query as ``"<instruction>; <query>"``
   (documents bare) and leaves the instruction's tokens out of the mean (``LLM2Vec``'s
   ``skip_instruction=True``): give a source ``"query_instruction": "...",
   "instruction_template": "{task}; "``; ``model.include_prompt`` is false here (ours, to pool
   the instruction too: ``--config.supervised.model.include_prompt=true``).

The LM head in MNTP. The release (experiments/run_mntp.py) applies PEFT to the inner model only
(``get_model_for_peft``), so an untied head (Llama, Mistral) keeps ``requires_grad`` and trains
in full, but only the inner model's adapter is saved: the trained head is thrown away; a tied
head (Gemma) is the frozen embedding matrix. Here the head is frozen with LoRA (an untied
head's V x D weights and Adam moments are not worth training to be discarded) and trained
without LoRA (full fine-tuning trains every weight); the gradient still reaches the tower's
LoRA factors through it.

Release settings (train_configs/{mntp,simcse,supervised}/MetaLlama3.json, and the defaults of
experiments/run_{mntp,simcse,supervised}.py and of HF's Trainer where a JSON sets nothing): MNTP
batch 32, 512 tokens, 1000 steps, p = 0.2 with 80/10/10 replacement (Mistral: p = 0.8, every
chosen token masked: ``--config.mntp.mntp.mask_probability=0.8 --config.mntp.mntp.mask_all=true``),
LoRA r = 16, alpha = 2r, dropout 0.05, lr 5e-5 (Trainer's default); SimCSE batch 128, 128
tokens, 1000 steps, lr 3e-5, attention dropout 0.3, loss scale 20 (τ = 0.05); supervised batch
64 per GPU (x 8), 512 tokens, 1000 steps, lr 2e-4, 300 warmup steps, loss scale 50 (τ = 0.02:
run_supervised.py's default, the JSONs set none). Every stage: AdamW with Trainer's defaults,
weight decay 0.0, eps 1e-8, betas (0.9, 0.999), gradient clipping 1.0, linear decay.

Labels: "release" = the authors' code or its train_configs say so; "ours" = our choice.

Export: the last stage's ``export/`` is a plain HF + sentence-transformers directory (LoRA
merged). Gemma3 writes ``use_bidirectional_attention: true``, which transformers (>= 5) and
sentence-transformers honour: ``SentenceTransformer(export)`` embeds as gte-jax does, no remote
code. Llama / Mistral / Qwen have no such switch in transformers: their export ships its modeling
code (gte_jax/hf_bidirectional.py), loaded with ``trust_remote_code=True``.

``configs/llm2vec.py:runlocal``: all three stages on a tiny random Gemma3 causal LM built
offline (gte_jax/models/tiny_decoder.py) and the bundled texts, a few minutes on a laptop CPU.
"""

from __future__ import annotations

import ml_collections

from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.defaults import stage_config

VARIANTS = ("runlocal", "supervised")


def _lora(c, rank: int = 16, dropout: float = 0.05) -> None:
    c.model.lora.enabled = True
    c.model.lora.rank = rank  # release: lora_r 16
    c.model.lora.alpha = 2.0 * rank  # release: lora_alpha = 2 * lora_r
    c.model.lora.dropout = dropout  # release: lora_dropout 0.05
    c.model.lora.target_modules = ()  # release: q k v o gate up down = every projection


def _common(c, init_from: str) -> None:
    c.model.init_from = init_from
    # AdamW as HF's Trainer runs it (no train_config / command line sets these):
    c.train.weight_decay = 0.0  # release: Trainer's default (stage_config: 0.01)
    c.train.adam_eps = 1e-8  # release: Trainer's default (stage_config: 1e-6)
    c.train.adam_b1 = 0.9  # release: Trainer's default
    c.train.adam_b2 = 0.999  # release: Trainer's default
    c.train.max_grad_norm = 1.0  # release: Trainer's default
    c.train.schedule = "linear"  # release: Trainer's default
    c.model.attention = "bidirectional"  # release: bidirectional true (step 1), and the export
    c.model.dtype = "bfloat16"  # release: torch_dtype bfloat16 (on CPU use float32)
    c.model.remat = True  # release: gradient_checkpointing
    c.model.normalize = True  # release: cosine similarity (mean pooling comes with the model dir)
    c.data.text_files = ""
    _lora(c)


def mntp_stage() -> ml_collections.ConfigDict:
    c = stage_config("mntp")
    c.kind = "mntp"
    _common(c, "")  # a decoder's *ForCausalLM directory (LM head needed)
    c.mntp.mask_probability = 0.2  # release (Llama-2/3): mlm_probability 0.2
    c.mntp.mask_all = False  # release: data_collator_type "default" (80/10/10)
    c.mntp.mask_token = "_"  # release: mask_token_type "blank"
    # The checkpoint's own dropout (decoders: none) + LoRA dropout 0.05, as the release.
    c.data.max_length = 512  # release: max_seq_length 512
    c.data.packing = True  # ours: several texts per row; labels move with their tokens
    c.train.batch_size = 32  # release
    c.train.num_steps = 1000  # release: stop_after_n_steps
    c.train.learning_rate = 5e-5  # release: Trainer's default
    c.train.warmup_ratio = 0.0  # release: Trainer's default
    c.checkpoint.every_steps = 200  # release: save_steps
    c.export.enabled = False  # the next stage starts from the workdir
    return c


def simcse_stage() -> ml_collections.ConfigDict:
    c = stage_config("simcse")
    c.kind = "simcse"
    _common(c, "stage:mntp")
    c.model.attention_dropout = 0.3  # release: simcse_dropout 0.3 (attention dropout)
    c.data.max_length = 128  # release
    c.data.packing = True  # ours: both views pack alike; their dropout masks still differ
    c.loss.name = "infonce"  # release: HardNegativeNLLLoss, view 1 -> every view 2 of the batch
    c.loss.symmetric = False  # release
    c.loss.temperature = 0.05  # release: loss_scale 20
    c.train.batch_size = 128  # release
    c.train.num_steps = 1000  # release
    c.train.learning_rate = 3e-5  # release
    c.train.warmup_ratio = 0.0  # release: Trainer's default
    c.checkpoint.every_steps = 200  # release: save_steps
    return c


def supervised_stage() -> ml_collections.ConfigDict:
    c = stage_config("supervised")
    _common(c, "stage:simcse")
    # release: LLM2Vec(skip_instruction=True) pools the text after the instruction only
    c.model.include_prompt = "false"
    c.model.dropout = 0.0  # release: run_supervised.py sets no dropout
    c.data.sources = []  # pairs with hard negatives (release: the public E5 mixture)
    c.data.mixed_batches = False  # release: E5Data forms each batch from one dataset
    c.data.alpha = 1.0  # release: those batches shuffled, so datasets in proportion to size
    c.data.max_length = 512  # release
    c.data.packing = True  # ours
    c.loss.name = "infonce"  # release: HardNegativeNLLLoss, q -> [all positives, all negatives]
    c.loss.symmetric = False  # release
    c.loss.temperature = 0.02  # release: run_supervised.py's loss_scale default 50
    c.train.batch_size = 512  # release: 64 per GPU; paper: 8 GPUs
    c.train.num_steps = 1000  # release
    c.train.learning_rate = 2e-4  # release
    c.train.warmup_steps = 300  # release
    c.train.gradcache = True  # ours: 512 texts of 512 tokens x 3 roles in chunks
    c.train.gradcache_chunk_size = 32  # ours
    c.checkpoint.every_steps = 200  # release: save_steps
    return c


def _runlocal(config: ml_collections.ConfigDict) -> None:
    """The same recipe on a tiny random Gemma3 and bundled texts (no download, CPU minutes)."""
    from gte_jax.models import tiny_decoder

    texts = [
        {"name": "news", "kind": "text", "path": str(DEMO_DIR / "news_lead_body.jsonl"),
         "text_field": "positive"},
        {"name": "chat", "kind": "text", "path": str(DEMO_DIR / "chat_qa.jsonl"),
         "text_field": "positive"},
    ]  # fmt: skip
    config.mntp.model.init_from = str(tiny_decoder.tiny_decoder_dir("gemma3_text"))
    config.mntp.data.sources = texts
    config.simcse.data.sources = [dict(t, text_field="query") for t in texts]
    config.supervised.data.sources = [
        {"name": "bible_hn", "path": str(DEMO_DIR / "bible_finetune.jsonl")}
    ]
    for name, steps in (("mntp", 8), ("simcse", 8), ("supervised", 6)):
        c = config[name]
        c.model.dtype = "float32"  # bf16 is slower on CPU
        c.model.remat = False
        _lora(c, rank=8)
        c.data.max_length = 64
        c.data.packing_row_multiple = 4  # ours: fewer row counts, fewer compiles
        c.train.batch_size = 16
        c.train.num_steps = steps
        c.train.warmup_ratio = 0.0
        c.train.warmup_steps = 0
        c.train.learning_rate = 1e-3  # a random tiny model moves in a few steps
        c.train.gradcache = False
        c.train.progress_bar = False
        c.train.log_every = 2
        c.checkpoint.every_steps = 4
        c.checkpoint.max_to_keep = 1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg and arg not in VARIANTS:
        raise ValueError(f"configs/llm2vec.py:{arg}: the variants are {', '.join(VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.stages = ["mntp", "simcse"]
    config.mntp = mntp_stage()
    config.simcse = simcse_stage()
    config.supervised = supervised_stage()
    if arg in ("supervised", "runlocal"):
        config.stages = ["mntp", "simcse", "supervised"]
        config.simcse.export.enabled = False
    if arg == "runlocal":
        _runlocal(config)
    return config
