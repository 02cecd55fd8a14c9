"""bf16 compute: the projections' rule (gte_jax/models/linear.py) against float64 NumPy on the
same bf16-rounded operands; every tower family in bf16 against itself in float32; the
``model.dtype`` rule and float32 in-training evaluation (gte_jax/models/precision.py)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gte_jax.models import lora
from gte_jax.models.linear import linear
from gte_jax.models.precision import compute_dtype, cpu_fast_bf16

REPO = pathlib.Path(__file__).resolve().parents[1]
BF16_EPS = 2.0**-8  # one bf16 rounding of a value (8 significant bits)


def _bf16_f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize("shape", [(3, 7, 48), (21, 48)])
@pytest.mark.numerics
def test_bf16_linear_and_its_gradients_match_float64(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((48, 40)) * 0.2, jnp.float32)
    b = jnp.asarray(rng.standard_normal(40), jnp.float32)
    g = jnp.asarray(rng.standard_normal((*shape[:-1], 40)), jnp.float32)  # upstream gradient

    def loss(x, w, b):
        return jnp.sum(linear(x, w, b, jnp.bfloat16).astype(jnp.float32) * g)

    y = linear(x, w, b, jnp.bfloat16)
    dx, dw, db = jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    # Parameter gradients keep the parameters' float32.
    assert dw.dtype == jnp.float32 and db.dtype == jnp.float32

    xs, ws, gs = _bf16_f64(x), _bf16_f64(w), _bf16_f64(g)
    lead = tuple(range(len(shape) - 1))
    y_ref = xs @ ws + np.asarray(b, np.float64)
    dw_ref = np.tensordot(xs, gs, axes=(lead, lead))
    db_ref = gs.sum(axis=lead)
    dx_ref = gs @ ws.T
    # Output and dx: one bf16 rounding of an f32-accumulated value.
    np.testing.assert_allclose(
        np.asarray(y, np.float64), y_ref, atol=2 * BF16_EPS * np.abs(y_ref).max()
    )
    np.testing.assert_allclose(
        np.asarray(dx, np.float64), dx_ref, atol=2 * BF16_EPS * np.abs(dx_ref).max()
    )
    # dW and db: f32 accumulation, no bf16 rounding (autodiff through kernel.astype(bf16) would
    # have rounded them: ~100x this tolerance).
    np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(db, np.float64), db_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.numerics
def test_float32_linear_is_nnx_linear_bitwise():
    layer = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    np.testing.assert_array_equal(np.asarray(lora.dense(layer, x)), np.asarray(layer(x)))
    np.testing.assert_array_equal(
        np.asarray(linear(x, layer.kernel[...], layer.bias[...], jnp.float32)),
        np.asarray(layer(x)),
    )


@pytest.mark.numerics
def test_bf16_nnx_linear_goes_through_the_mixed_rule():
    layer = nnx.Linear(16, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16)).astype(jnp.bfloat16)
    y = lora.dense(layer, x)
    assert y.dtype == jnp.bfloat16
    ref = _bf16_f64(x) @ _bf16_f64(layer.kernel[...]) + np.asarray(layer.bias[...], np.float64)
    np.testing.assert_allclose(
        np.asarray(y, np.float64), ref, atol=2 * BF16_EPS * np.abs(ref).max()
    )

    def loss(model):
        return jnp.sum(lora.dense(model, x).astype(jnp.float32))

    grads = nnx.grad(loss)(layer)
    assert grads.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(grads.kernel[...], np.float64),
        np.broadcast_to(_bf16_f64(x).sum(axis=(0, 1))[:, None], (16, 8)),
        rtol=1e-5,
    )


def test_compute_dtype_rule(tmp_path):
    assert compute_dtype("float32") == jnp.float32
    assert compute_dtype("bfloat16", "cpu") == jnp.bfloat16
    for accelerator in ("tpu", "gpu"):
        assert compute_dtype("auto", accelerator) == jnp.bfloat16
    assert compute_dtype("auto", "cpu", fast_bf16=True) == jnp.bfloat16
    assert compute_dtype("auto", "cpu", fast_bf16=False) == jnp.float32
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        compute_dtype("float16")
    cpus = {  # /proc/cpuinfo flags -> whether XLA:CPU's bf16 dots are the fast choice
        "spr": ("fpu avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids: AMX
        "zen4": ("fpu avx2 avx512f avx512_bf16", True),  # AMD EPYC Zen 4: AVX-512 BF16
        "skylake": ("fpu avx2 avx512f", False),  # AVX-512 without BF16
        "zen2": ("fpu avx2", False),
    }
    fast = cpu_fast_bf16.__wrapped__
    for name, (flags, expected) in cpus.items():
        path = tmp_path / name
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert fast(str(path), "") is expected, name
        # XLA held to AVX2 has no bf16 instructions: float32 whatever the CPU
        capped = "--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX2"
        assert fast(str(path), capped) is False, name
        assert fast(str(path), "--xla_cpu_max_isa=AVX512") is expected, name
    assert not fast(str(tmp_path / "missing"), "")


def test_a_bad_model_dtype_is_refused_at_start_up(tmp_path, capsys):
    from gte_jax.cli import main

    rc = main(
        ["train", "--config", str(REPO / "configs/finetune.py"), "--workdir", str(tmp_path / "w"),
         f"--config.data.train_files={REPO}/gte_jax/resources/demo/bible_finetune.jsonl",
         "--config.model.dtype=float16"]
    )  # fmt: skip
    assert rc == 2
    assert "model.dtype='float16'" in capsys.readouterr().err


def _family_dir(family, tmp_path, tiny_model_dir):
    from tiny_models import tiny_decoder_dir, tiny_t5_dir

    if family == "bert":
        return tiny_model_dir
    if family == "t5":
        return tiny_t5_dir(tmp_path)
    return tiny_decoder_dir(tmp_path, family)


@pytest.mark.parametrize("family", ["bert", "qwen2", "t5"])
def test_bf16_towers_track_float32_and_as_float32_is_the_float32_model(
    family, tmp_path, tiny_model_dir
):
    """Every family through the bf16 rule: embeddings and parameter gradients close to the same
    model in float32 (bf16 tolerance, and not equal: bf16 really ran), and ``as_float32`` of the
    bf16 model is bitwise the float32 model (what in-training eval uses)."""
    from gte_jax import workdir as wd
    from gte_jax.models.encoder import ModelFn
    from gte_jax.models.precision import as_float32

    path = _family_dir(family, tmp_path, tiny_model_dir)
    f32, tok, _ = wd.load_model(path, dtype=jnp.float32)
    b16, _, _ = wd.load_model(path, dtype=jnp.bfloat16)
    enc = tok(["the quick brown fox", "in the beginning was the word and"], padding=True,
              return_tensors="np")  # fmt: skip
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    probe = jax.random.normal(jax.random.key(3), (2, f32.embedding_dim))

    def value_and_grads(model):
        fn, params = ModelFn.from_module(model)

        def loss(p):
            return jnp.sum(fn.module(p)(ids, mask) * probe)

        return jax.jit(jax.value_and_grad(loss))(params)  # one compile, not one per op

    (v32, g32), (v16, g16) = value_and_grads(f32), value_and_grads(b16)
    g32 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g32)])
    g16 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g16)])
    assert g16.dtype == np.float32
    assert float(v16) != float(v32) and not np.array_equal(g16, g32)  # bf16 ran
    assert abs(float(v16) - float(v32)) < 0.05 * (abs(float(v32)) + 1e-3)
    cos = float(g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32)))
    assert cos > 0.999, cos
    assert np.linalg.norm(g16 - g32) < 0.05 * np.linalg.norm(g32)

    twin = as_float32(b16)
    np.testing.assert_array_equal(np.asarray(twin(ids, mask)), np.asarray(f32(ids, mask)))


def test_in_training_eval_runs_the_export_in_float32(tiny_model_dir, tmp_path, monkeypatch):
    """A bf16 run's in-training eval sees the float32 model: at the last eval its embeddings are
    bitwise those of the export loaded as `gte-jax eval` / `encode` load it."""
    from gte_jax import evaluation
    from gte_jax import workdir as wd
    from gte_jax.cli import main
    from gte_jax.data.pipeline import DEMO_DIR

    seen = []
    call = evaluation.EvalSuite.__call__

    def spy(self, model, tokenizer, **kwargs):
        seen.append((model, tokenizer))
        return call(self, model, tokenizer, **kwargs)

    monkeypatch.setattr(evaluation.EvalSuite, "__call__", spy)
    config = tmp_path / "eval_config.py"
    config.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('ft', {str(REPO / 'configs/finetune.py')!r})\n"
        "ft = importlib.util.module_from_spec(spec); spec.loader.exec_module(ft)\n"
        "def get_config():\n"
        "    c = ft.get_config()\n"
        f"    c.eval.sets = [{{'name': 'bible', 'kind': 'beir', 'path': {str(DEMO_DIR / 'bible_eval')!r}}}]\n"
        "    return c\n"
    )
    workdir = tmp_path / "w"
    rc = main(
        ["train", "--config", str(config), "--workdir", str(workdir),
         f"--config.model.init_from={tiny_model_dir}",
         f"--config.data.train_files={DEMO_DIR / 'bible_finetune.jsonl'}",
         "--config.model.dtype=bfloat16", "--config.data.max_length=32",
         "--config.train.batch_size=16", "--config.train.num_steps=2",
         "--config.train.learning_rate=1e-3", "--config.train.progress_bar=false",
         "--config.checkpoint.async_save=false",
         "--config.model.dropout=0"]  # the eval's dtype, not dropout (~1/3 of the compile)
    )  # fmt: skip
    assert rc == 0 and len(seen) >= 2  # at step 0 and at the end
    model, tokenizer = seen[-1]
    exported, _, _ = wd.load_model(workdir / "export")
    enc = tokenizer(["and god said", "let there be light"], padding=True, return_tensors="np")
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    np.testing.assert_array_equal(np.asarray(model(ids, mask)), np.asarray(exported(ids, mask)))
