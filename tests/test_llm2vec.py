"""LLM2Vec (BehnamGhader et al., 2024) as stages of the one loop: the MNTP step against
transformers' causal-LM loss on the same weights and masks, the LM head on masked positions only
(== the full [B, L, V] computation), bidirectional attention that really is bidirectional
(padded and packed rows), and the three-stage ``configs/llm2vec.py:runlocal`` recipe through
``gte-jax train`` with an export that plain transformers / sentence-transformers load
bidirectionally, without remote code."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from conftest import child_env
from tiny_models import tiny_decoder_dir

from gte_jax import hf, losses, train
from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.mntp import IGNORE, MntpMasking
from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.data.sources import from_files
from gte_jax.models.encoder import ModelFn
from gte_jax.training import loop

TOL = 1e-5
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
REPO = CONFIGS.parent


# ------------------------------------------------------------------ the LM head on masked positions


def _random_case(seed=0, b=3, length=11, d=8, v=37, p=0.3):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, length, d)).astype(np.float32)
    kernel = rng.normal(size=(d, v)).astype(np.float32)
    labels = np.where(rng.random((b, length)) < p, rng.integers(0, v, (b, length)), IGNORE)
    return jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(labels, jnp.int32)


def _head(w, h):
    return jnp.einsum("...d,dv->...v", h, w, precision="highest")


@pytest.mark.parametrize("block", [1, 4, 512])
def test_mntp_loss_on_masked_positions_equals_the_full_logits(block):
    """Value, accuracy and gradients (hidden and LM head) of the gathered computation == the
    [B, L, V] one (losses.mntp_loss), for blocks smaller and larger than the masked count."""
    hidden, kernel, labels = _random_case()

    def gathered(h, w):
        nll, correct, count = losses.mntp_loss_sums(h, labels, _head, w, block_size=block)
        return nll / jnp.maximum(count, 1), (correct / count, count)

    def full(h, w):
        loss, m = losses.mntp_loss(_head(w, h), labels)
        return loss, (m["accuracy"], m["num_masked"])

    (got, (acc, count)), g_got = jax.jit(jax.value_and_grad(gathered, (0, 1), has_aux=True))(
        hidden, kernel
    )
    (want, (acc_w, count_w)), g_want = jax.value_and_grad(full, (0, 1), has_aux=True)(
        hidden, kernel
    )
    assert int(count) == int(count_w) > 5
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(acc, acc_w)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Nothing masked: 0, not NaN.
    empty = jnp.full_like(labels, IGNORE)
    nll, _, count = losses.mntp_loss_sums(hidden, empty, _head, kernel, block_size=block)
    assert float(nll) == 0.0 and int(count) == 0


def test_mntp_logits_never_cover_every_position():
    """The compiled value-and-grad holds a block of scored positions' logits, not [B, L, V]:
    its scratch memory does not grow with the batch (4x the rows: less than one more block)."""
    block, vocab = 32, 1024

    def temp_bytes(b):
        hidden, kernel, labels = _random_case(b=b, length=32, d=16, v=vocab)

        def loss(h, w):
            return losses.mntp_loss_sums(h, labels, _head, w, block_size=block)[0]

        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(hidden, kernel).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(4), temp_bytes(16)
    full = 16 * 31 * vocab * 4  # one float32 copy of [B, L - 1, V]
    assert large < full / 5, (large, full)
    assert large - small < block * vocab * 4, (small, large)


# ------------------------------------------------------------------ the MNTP step vs transformers


def _mntp_batches(path, *, packing: bool, mask_probability=0.3, batch_size=8):
    tokenizer = hf.load_tokenizer(path)
    masking = MntpMasking(
        mask_probability, tokenizer.convert_tokens_to_ids("_"),
        frozenset(tokenizer.all_special_ids), len(tokenizer), mask_all=False, seed=1,
    )  # fmt: skip
    source = from_files("news", DEMO_DIR / "news_lead_body.jsonl", text_field="query")
    it = PairBatchIterator(
        [source], tokenizer, global_batch_size=batch_size, query_max_length=48,
        doc_max_length=48, packing=packing, mntp=masking,
    )  # fmt: skip
    return next(it)


def _texts_of(batch):
    """(masked ids, labels) of each text of a padded or packed MNTP batch."""
    ids, labels = batch["query_input_ids"], batch["query_labels"]
    if "query_slot_index" not in batch:
        keep = batch["query_attention_mask"].astype(bool)
        return [(ids[i][keep[i]], labels[i][keep[i]]) for i in range(len(ids))]
    out = []
    for slot in batch["query_slot_index"]:
        r, s = divmod(int(slot), ids.shape[1])
        cols = batch["query_segment_ids"][r] == s + 1
        out.append((ids[r][cols], labels[r][cols]))
    return out


def _torch_reference(path, texts):
    """transformers' causal-LM loss on each text alone (no padding), pooled over all masked
    tokens: sum of per-text mean loss x its count / total count."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    total = count = 0.0
    with torch.no_grad():
        for ids, labels in texts:
            n = int((labels[1:] != IGNORE).sum())
            if not n:
                continue
            out = model(
                input_ids=torch.tensor(ids[None], dtype=torch.long),
                labels=torch.tensor(labels[None], dtype=torch.long),
            )
            total += float(out.loss) * n
            count += n
    return total / count, count


def _one_step(path, batch, *, attention, num_chunks=1, lora=False):
    from flax import nnx

    from gte_jax.models import lora as lora_lib

    model, _ = hf.load_model(path, attention=attention)
    if lora:
        lora_lib.inject(model, lora_lib.LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    model_fn, params = ModelFn.from_module(model)
    trainable, frozen = model_fn.split_params(params)
    tx = optax.sgd(0.1)
    state = train.init_train_state(trainable, tx, 0, frozen)
    step = train.make_train_step(
        model_fn, tx, loss_name="gte", loss_kwargs={"temperature": 0.05}, dropout=False,
        kind="mntp", num_chunks=num_chunks,
    )  # fmt: skip
    new_state, metrics = jax.jit(step)(state, jax.tree.map(jnp.asarray, batch))
    return state, new_state, metrics


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("l2v_decoders")
    return {
        # untied lm_head, causal (Llama); tied head, bidirectional by its own config (Gemma3)
        "llama": (tiny_decoder_dir(root, "llama"), "causal"),
        "gemma3_text": (
            tiny_decoder_dir(root, "gemma3_text", use_bidirectional_attention=True),
            "bidirectional",
        ),
    }


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("packing", [False, True])
def test_mntp_step_loss_equals_transformers_causal_lm(decoders, family, packing):
    """The real train step's MNTP loss == transformers' CausalLM loss (its own shift by one) on
    the same weights and the same masked tokens, padded and packed rows, tied and untied LM
    heads, causal and bidirectional attention."""
    path, attention = decoders[family]
    batch = _mntp_batches(path, packing=packing)
    texts = _texts_of(batch)
    want, count = _torch_reference(path, texts)
    _, _, metrics = _one_step(path, batch, attention=attention)
    assert int(metrics["num_masked"]) == count > 20
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=TOL, atol=TOL)
    assert bool(metrics["finite"])


def test_mntp_chunks_and_lora(decoders):
    """GradCache chunks give the one-chunk loss and update (the untied LM head trains without
    LoRA); with LoRA the loss at B = 0 is the base model's, only the LoRA factors move and the
    LM head stays frozen."""
    path, attention = decoders["llama"]
    batch = _mntp_batches(path, packing=False)
    old, one, m1 = _one_step(path, batch, attention=attention)
    _, two, m2 = _one_step(path, batch, attention=attention, num_chunks=2)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    head = ("encoder", "lm_head", "kernel")

    def at(params, path):
        for k in path:
            params = params[k]
        return np.asarray(params)

    assert np.abs(at(one["params"], head) - at(old["params"], head)).max() > 0  # trained
    np.testing.assert_allclose(at(two["params"], head), at(one["params"], head), atol=1e-6)
    lstate, lnew, lm = _one_step(path, batch, attention=attention, lora=True)
    np.testing.assert_allclose(lm["loss"], m1["loss"], rtol=1e-6)
    assert "lm_head" not in lnew["params"]["encoder"] and "lm_head" in lnew["frozen"]["encoder"]
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), lnew["params"], lstate["params"])
    assert max(jax.tree.leaves(moved)) > 0


def test_mntp_without_an_lm_head_is_refused_at_start_up(tmp_path, monkeypatch):
    """A plain *Model decoder (no lm_head, untied) cannot run kind=mntp: a TrainingError naming
    the model, before any step."""
    from gte_jax.config import load_config

    monkeypatch.setenv("GTE_JAX_CACHE", str(tmp_path / "cache"))  # runlocal builds its model

    path = tiny_decoder_dir(tmp_path, "llama", causal_lm=False)
    config = load_config(f"{CONFIGS / 'llm2vec.py'}:runlocal").mntp
    config.model.init_from = str(path)
    with pytest.raises(train.TrainingError, match="has none"):
        loop.train_stage(config, tmp_path / "run")


# ------------------------------------------------------------------ bidirectional, really


def _hidden(model, ids, mask, segments=None):
    return np.asarray(
        model.encoder(jnp.asarray(ids), jnp.asarray(mask), segment_ids=segments), np.float32
    )


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_a_later_token_changes_an_earlier_one_iff_bidirectional(decoders, attention):
    """Padded rows (the shorter text right- and left-padded) and packed rows (two texts in one
    row): changing a text's last token changes its first tokens' states iff bidirectional, and
    never another text's (packing keeps texts apart). tests/test_decoder.py covers batch size 1
    and packed == unpacked."""
    path, _ = decoders["gemma3_text"]
    model, _ = hf.load_model(path, attention=attention)
    a, b = [5, 17, 33, 40, 61, 7, 9], [11, 12, 13, 14]
    bidirectional = attention == "bidirectional"
    for side in ("right", "left"):
        ids = np.zeros((2, 7), np.int32)
        mask = np.zeros((2, 7), np.int32)
        ids[0], mask[0] = a, 1
        cols = slice(0, 4) if side == "right" else slice(3, 7)
        ids[1, cols], mask[1, cols] = b, 1
        changed = ids.copy()
        changed[1, cols.stop - 1] = 99  # the padded text's last real token
        before, after = _hidden(model, ids, mask), _hidden(model, changed, mask)
        early = np.abs(before[1, cols.start : cols.stop - 1] - after[1, cols.start : cols.stop - 1])
        assert (early.max() > 1e-4) == bidirectional, (side, attention, early.max())
        np.testing.assert_array_equal(before[0], after[0])  # the other row
    ids = np.asarray([a + b + [0]], np.int32)
    seg = np.asarray([[1] * 7 + [2] * 4 + [0]], np.int32)
    changed = ids.copy()
    changed[0, 6] = 99  # text 1's last token
    before, after = (
        _hidden(model, ids, (seg > 0).astype(np.int32), seg),
        _hidden(model, changed, (seg > 0).astype(np.int32), seg),
    )
    assert (np.abs(before[0, :6] - after[0, :6]).max() > 1e-4) == bidirectional
    np.testing.assert_array_equal(before[0, 7:11], after[0, 7:11])  # text 2 never sees text 1


# ------------------------------------------------------------------ the recipe end to end


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """`gte-jax train --config configs/llm2vec.py:runlocal`: mntp -> simcse -> supervised on a
    tiny random Gemma3 built offline into a fresh cache."""
    cache = tmp_path_factory.mktemp("gte_jax_cache")
    env = {**child_env(1), "PYTHONPATH": str(REPO)}
    env["GTE_JAX_CACHE"] = str(cache)
    workdir = tmp_path_factory.mktemp("llm2vec") / "run"
    cmd = [
        sys.executable, "-m", "gte_jax.cli", "train", "--config",
        f"{CONFIGS / 'llm2vec.py'}:runlocal", "--workdir", str(workdir), "--log_level=WARNING",
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _summary(workdir, stage):
    return json.loads((workdir / stage / "summary.json").read_text())


def test_llm2vec_runlocal_three_stages_and_a_bidirectional_export(recipe):
    """Each stage completes from the one before (LoRA merged between stages); the export loads
    in plain transformers (AutoModel, no remote code) with bidirectional attention and in
    sentence-transformers, both reproducing gte-jax's encode (cos >= 0.99999)."""
    from sentence_transformers import SentenceTransformer

    from gte_jax.encode import Embedder

    for stage, kind in (("mntp", "mntp"), ("simcse", "simcse"), ("supervised", "contrastive")):
        summary = _summary(recipe, stage)
        assert summary["completed"] and np.isfinite(summary["final_loss"]), stage
        config = json.loads((recipe / stage / "config.json").read_text())
        assert config["kind"] == kind and config["model"]["attention"] == "bidirectional"
        assert (recipe / stage / "lora.json").exists()  # every stage trains LoRA
    mntp_card = json.loads((recipe / "supervised" / "card.json").read_text())
    assert [s["name"] for s in mntp_card["stages"]] == ["mntp", "simcse", "supervised"]

    export = recipe / "supervised" / "export"
    hf_config = json.loads((export / "config.json").read_text())
    assert hf_config["use_bidirectional_attention"] is True and "auto_map" not in hf_config
    texts = [
        "The Hume Highway was closed by a new blaze near Goulburn.",
        "What is the capital of Australia?",
        "In the beginning God created the heaven and the earth.",
    ]
    ours = Embedder.from_pretrained(export).encode(texts)

    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModel.from_pretrained(export).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    pooled = (hidden * m).sum(1) / m.sum(1)
    theirs = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    assert (np.sum(ours * theirs, axis=1) >= 0.99999).all(), np.sum(ours * theirs, axis=1)
    st = SentenceTransformer(str(export), device="cpu").encode(texts)
    cos = np.sum(ours * st, axis=1) / np.linalg.norm(st, axis=1)
    assert (cos >= 0.99999).all(), cos

    ids = tokenizer(texts[0], return_tensors="pt")["input_ids"]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 7) % 500 + 3
    with torch.no_grad():
        early = model(input_ids=ids).last_hidden_state - model(input_ids=changed).last_hidden_state
    assert float(early[0, :-1].abs().max()) > 1e-4  # a later token reaches earlier ones


def test_llama_bidirectional_export_runs_bidirectional_in_transformers(decoders, tmp_path):
    """Llama / Mistral / Qwen have no bidirectional switch in transformers: the export ships its
    modeling code under a model_type of gte-jax's (gte_jax/hf_bidirectional.py), so AutoModel
    with trust_remote_code reproduces gte-jax with the usual 2D mask, and without it refuses."""
    path, _ = decoders["llama"]
    model, tokenizer, info = hf.load_pretrained(path, attention="bidirectional")
    hf.export_pretrained(model, tokenizer, tmp_path / "llama_export", info=info)
    config = json.loads((tmp_path / "llama_export" / "config.json").read_text())
    assert config["gte_jax_attention"] == "bidirectional" and "auto_map" in config
    texts = ["What is AI?", "A new blaze near Goulburn has forced the closure of the Hume."]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    ours = _hidden(model, ids, mask)
    torch_model = transformers.AutoModel.from_pretrained(
        tmp_path / "llama_export", trust_remote_code=True
    ).eval()
    with torch.no_grad():
        bidi = torch_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask, dtype=torch.long)
        ).last_hidden_state
    real = mask.astype(bool)
    assert np.abs(bidi.numpy() - ours)[real].max() < TOL
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModel.from_pretrained(tmp_path / "llama_export", trust_remote_code=False)


def test_mntp_stage_resumes_bitwise_on_8_devices(tmp_path, monkeypatch):
    """The runlocal MNTP stage (packed rows, LoRA, LoRA dropout) on the 8 fake devices: 4 steps
    with a checkpoint at 2; the step-4 checkpoint removed, a rerun resumes from step 2 and ends
    with the same LoRA factors, Adam moments and step, bit for bit (masks are a function of
    (seed, step), the data state is in the checkpoint)."""
    import shutil

    from gte_jax.checkpoint import Checkpointer
    from gte_jax.config import load_config

    monkeypatch.setenv("GTE_JAX_CACHE", str(tmp_path / "cache"))
    config = load_config(f"{CONFIGS / 'llm2vec.py'}:runlocal").mntp
    config.train.num_steps, config.checkpoint.every_steps = 4, 2
    config.checkpoint.max_to_keep, config.checkpoint.async_save = 3, False
    config.train.log_every = 1

    def final(workdir):
        ckpt = Checkpointer(workdir / "checkpoints", every_steps=0)
        step, state = ckpt.restore_unsharded()
        ckpt.close()
        return step, jax.device_get(state)

    workdir = tmp_path / "mntp"
    first = loop.train_stage(config, workdir)
    assert first["completed"] and first["loss_floor"] == 0.0 and first["final_accuracy"] >= 0
    step, want = final(workdir)
    assert step == 4 and set(want) == {"params", "opt_state", "step", "rng"}
    shutil.rmtree(workdir / "checkpoints" / "4")
    (workdir / "summary.json").unlink()
    again = loop.train_stage(config, workdir)
    assert again["resumed_from_step"] == 2 and again["completed"]
    step, got = final(workdir)
    assert step == 4 and jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    logged = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").open()]
    losses_by_step = {}
    for row in logged:
        if "train/loss" in row:
            losses_by_step.setdefault(row["step"], set()).add(row["train/loss"])
    assert all(len(v) == 1 for v in losses_by_step.values())  # steps 3, 4 logged twice, equal
    assert sum(row["step"] == 4 for row in logged if "train/loss" in row) == 2
    assert all(row["train/num_masked"] > 0 for row in logged if "train/num_masked" in row)


def test_full_size_mntp_step_traces_for_plan():
    """`gte-jax plan`'s abstract step of the recipe's MNTP stage at Mistral-7B's shape traces
    (jax.eval_shape: no memory) with the MNTP batch (labels, the query tower only)."""
    from gte_jax import plan, sharding
    from gte_jax.config import load_config

    config = load_config(CONFIGS / "llm2vec.py").mntp
    hf_config, _ = plan.model_shape(config.model, "mistral-7b")
    hf_config = dict(hf_config, architectures=["MistralForCausalLM"])  # the LM head
    step = plan.abstract_step(config, sharding.make_mesh(8, 1), hf_config)
    assert step.batch["query_labels"].shape == (32, 512) and step.towers == [(32, 512)]
    state, metrics = jax.eval_shape(step.step_fn, step.state, step.batch)
    assert metrics["loss"].shape == () and "num_masked" in metrics
    assert jax.tree.structure(state) == jax.tree.structure(step.state)
