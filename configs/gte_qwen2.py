"""gte-Qwen2-instruct: GTE's decoder-LLM embedder (Alibaba-NLP/gte-Qwen2-7B-instruct, model card).

What the card states: Qwen2-7B with *bidirectional* attention, instructions on the query side
only ("Instruct: {task}\\nQuery: {q}", documents bare), the last token's hidden state as the
embedding (its ``last_token_pool``, correct for left and right padding), cosine similarity, and
GTE's multi-stage contrastive training (weakly supervised pairs, then supervised data with hard
negatives; Li et al., 2023). Its training hyper-parameters are not published: every training value
below is "ours" unless it names GTE's paper (GTE §3: τ = 0.01, the joint-partition loss). This is
the supervised (fine-tuning) stage; the weakly supervised stage is the same file with
``--config.data.sources`` of pairs and a larger batch.

    gte-jax train --config configs/gte_qwen2.py --workdir runs/gte_qwen2 \
        --config.model.init_from=/path/to/Qwen2-7B \
        --config.data.sources='[{"path": "pairs.jsonl", "query_instruction": "Given a web search query, retrieve relevant passages that answer the query", "instruction_template": "e5"}]'
    gte-jax plan --config configs/gte_qwen2.py --topology v5p-8 --model-config qwen2-7b

The export is a Qwen2 checkpoint under gte-jax's own ``model_type``
(``gte_jax_bidirectional_qwen2``) with its modeling code, as gte-Qwen2 ships on the hub:
``SentenceTransformer(export, trust_remote_code=True)`` runs it bidirectionally, as ``gte-jax
encode`` does; without ``trust_remote_code`` transformers refuses it rather than running it causal
(gte_jax/hf_bidirectional.py). gte-jax reads it back from its ``config.json`` alone.

``configs/gte_qwen2.py:runlocal`` trains it on a CPU (20-85 s on 2 cores, XLA cache warm / cold) from a tiny random Qwen2-shaped
decoder (gte_jax/models/tiny_decoder.py, written offline once under $GTE_JAX_CACHE or
~/.cache/gte-jax) on the bundled Bible pairs with their hard negatives.
"""

from __future__ import annotations

from gte_jax.defaults import decoder_runlocal, stage_config

DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEB_SEARCH_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def get_config(arg: str | None = None):
    c = stage_config("gte_qwen2")
    c.model.init_from = ""  # a Qwen2-7B directory (HF safetensors, sharded or not)
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.attention = "bidirectional"  # card: bidirectional attention
    c.model.pooling = "last"  # card: last_token_pool
    c.model.append_eos = True  # ours: the last token is an EOS (<|endoftext|>), as E5-mistral
    c.model.padding_side = "left"  # ours; the card's pooling handles either side
    c.model.include_prompt = "true"  # moot for last-token pooling; sentence-transformers' default
    c.model.normalize = True  # card: normalised embeddings, cosine similarity
    c.model.dropout = 0.0  # Qwen2 has none
    c.model.lora.enabled = True  # ours (the card does not say): fits a v5p-8 with room
    c.model.lora.rank = 16  # ours
    c.model.lora.alpha = 32.0  # ours
    c.model.lora.dropout = 0.1  # ours
    c.model.lora.target_modules = DECODER_PROJECTIONS  # ours

    c.data.sources = [
        {"path": "pairs.jsonl", "query_instruction": WEB_SEARCH_TASK, "instruction_template": "e5"}
    ]
    c.data.query_max_length = 512  # ours
    c.data.doc_max_length = 512
    c.data.packing = False  # ours: padded rows (left); packing=True trains the same, faster
    c.data.mixed_batches = False  # GTE §3.2: one source per batch

    c.loss.name = "gte"  # GTE §3: the joint partition (q->d, q->q, d->q, d->d)
    c.loss.temperature = 0.01  # GTE §3

    c.train.batch_size = 2048  # ours
    c.train.epochs = 1.0
    c.train.num_steps = 0
    c.train.learning_rate = 1e-4  # ours (LoRA)
    c.train.warmup_steps = 100
    c.train.schedule = "linear"
    c.train.weight_decay = 0.1
    c.train.gradcache = True
    c.train.gradcache_chunk_size = 64
    c.sharding.params = "fsdp"
    c.checkpoint.every_steps = 100

    if arg == "runlocal":  # big_vision's switch: the same recipe, shrunk for a laptop
        decoder_runlocal(c, "qwen2")
    return c
