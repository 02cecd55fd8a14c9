"""E5-mistral: a decoder LLM fine-tuned into an embedder (Wang et al., 2024, "Improving Text
Embeddings with Large Language Models", §3.2, §4.2 and App. A).

Mistral-7B, causal attention as pretrained, an EOS appended to every query and document and its
last hidden state pooled, instructions on queries only ("Instruct: {task}\\nQuery: {q}"),
documents bare, InfoNCE (τ = 0.02) over in-batch and hard negatives, LoRA rank 16, 1 epoch of
~1.8M examples at batch 2048 (about 880 steps).

    gte-jax train --config configs/e5_mistral.py --workdir runs/e5_mistral \
        --config.model.init_from=/path/to/Mistral-7B-v0.1 \
        --config.data.sources='[{"path": "msmarco.jsonl", "query_instruction": "Given a web search query, retrieve relevant passages that answer the query", "instruction_template": "e5"}]'
    gte-jax plan --config configs/e5_mistral.py --topology v4-8 --model-config mistral-7b
    gte-jax encode --model runs/e5_mistral --input q.txt --output q.npy \
        --instruction "Given a web search query, retrieve relevant passages that answer the query"

Each source names its task (``query_instruction``) and uses the ``"e5"`` template
(gte_jax/prompts.py); records with an ``instruction`` field override it. The export records the
template, so ``encode --instruction`` above formats the task as training did without
``--template`` (another template is refused). The export
(``runs/e5_mistral/export``: merged weights, last-token Pooling, Normalize, the tokenizer
appending EOS and padding left, the sources' prompts) loads in ``SentenceTransformer``; the LoRA
adapter alone is in ``export/lora_adapter`` (PEFT's format). Values marked "ours" are not given by
the paper; "RankLLaMA" = the recipe the paper says it follows (Ma et al., 2023; tevatron).

Prompt tokens are pooled or not (``model.include_prompt``) by one rule everywhere; with last-token
pooling the pooled token is the EOS after the text, never a prompt token, so the setting only
has to agree between training, encode and export: "true" (the instruction is part of the input
the last token attends to, as in the paper), which is also what sentence-transformers writes.

``configs/e5_mistral.py:runlocal`` trains the same recipe on a CPU (20-85 s on 2 cores: ~20 s
with a warm XLA cache on the development machine, 74-84 s measured cold on a user's): a tiny random
Mistral-shaped decoder (gte_jax/models/tiny_decoder.py, written offline once under
$GTE_JAX_CACHE or ~/.cache/gte-jax), the bundled Bible pairs with their hard negatives, LoRA on
every projection, GradCache chunks with remat and packing.
"""

from __future__ import annotations

from gte_jax.defaults import decoder_runlocal, stage_config

# RankLLaMA's targets: every projection of the attention and MLP blocks.
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E5_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def get_config(arg: str | None = None):
    c = stage_config("e5_mistral")
    c.model.init_from = ""  # a Mistral-7B-v0.1 directory (HF safetensors, sharded or not)
    c.model.dtype = "bfloat16"  # App. A: mixed precision; params stay float32
    c.model.remat = True  # App. A: gradient checkpointing
    c.model.attention = "causal"  # §3.2: Mistral as pretrained
    c.model.pooling = "last"  # §3.2: the last layer's [EOS] vector
    c.model.append_eos = True  # §3.2: [EOS] appended to queries and documents
    c.model.padding_side = "left"  # ours (as the release's tokenizer): the EOS sits at column -1
    c.model.include_prompt = "true"  # moot for last-token pooling (see above); ST's default
    c.model.normalize = True  # §3.2: cosine similarity
    c.model.dropout = 0.0  # Mistral has none
    c.model.lora.enabled = True
    c.model.lora.rank = 16  # §4.2
    c.model.lora.alpha = 32.0  # ours (2 x rank)
    c.model.lora.dropout = 0.1  # ours (RankLLaMA / tevatron's default)
    c.model.lora.target_modules = DECODER_PROJECTIONS  # RankLLaMA

    # §4.2: synthetic data + 13 public datasets (~1.8M examples); each source names its task.
    c.data.sources = [
        {
            "path": "pairs.jsonl",
            "query_instruction": E5_TASK,
            "instruction_template": "e5",
            "num_negatives": 1,  # ours: one mined hard negative per query (Eq. 2's hard negatives)
        }
    ]
    c.data.query_max_length = 512  # App. A: 512 tokens
    c.data.doc_max_length = 512
    c.data.packing = False  # ours: padded rows (left); packing=True trains the same, faster
    c.data.mixed_batches = False  # ours: one source (task) per batch, as E5's data loader

    c.loss.name = "infonce"  # §3.2, Eq. 2: in-batch + hard negatives, q -> d
    c.loss.temperature = 0.02  # §3.2
    c.loss.symmetric = False

    c.train.batch_size = 2048  # App. A
    c.train.epochs = 1.0  # §4.2
    c.train.num_steps = 0  # derived from the data; plan needs it: ~1.8M / 2048 = 879
    c.train.learning_rate = 1e-4  # App. A
    c.train.warmup_steps = 100  # App. A
    c.train.schedule = "linear"  # App. A: linear decay
    c.train.weight_decay = 0.1  # App. A
    c.train.gradcache = True  # ours (the paper used ZeRO-3 + checkpointing): batch 2048 exact
    c.train.gradcache_chunk_size = 64  # ours: 8 examples per chip per chunk on 8 chips
    c.sharding.params = "fsdp"  # the 7B base split over the chips (App. A: ZeRO-3)
    c.checkpoint.every_steps = 100

    if arg == "runlocal":  # big_vision's switch: the same recipe, shrunk for a laptop
        decoder_runlocal(c, "mistral")
    return c
