"""Weight interpolation at export (`gte-jax export --interpolate MODEL=W`, gte_jax/interpolate.py):
the written tensors are (1 - W)·own + W·partner, checked per tensor in float64 NumPy against the
plain exports of both models; the result loads in sentence-transformers and embeds like
`gte-jax encode`; W = 0 is the plain export bit for bit; LoRA runs are merged first; models that
cannot be mixed exit 2 with one line.

The workdirs are built without training: ``base_model/`` plus one checkpoint of perturbed
parameters (what ``workdir._checkpoint_model`` reads), siblings under one root like a
multi-stage run's stages."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from gte_jax import cli, hf, interpolate
from gte_jax.checkpoint import Checkpointer
from gte_jax.defaults import stage_config
from gte_jax.models import lora
from gte_jax.models.bert import EncoderConfig
from gte_jax.models.encoder import BiEncoder, ModelFn
from gte_jax.ranges import range_problems
from gte_jax.workdir import LORA_ADAPTER_DIR, LORA_FILE, interpolation_partner
from tests.conftest import TINY_BERT

TEXTS = ["The cat sat on the mat.", "How do I reset my password?", "ünïcödé 東京", "Sourdough."]
EPS32 = float(np.finfo(np.float32).eps)


def _perturbed(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x)).astype(np.float32), tree
    )


def _fake_workdir(path: pathlib.Path, base_dir: pathlib.Path, seed: int, *, rank: int = 0):
    """A stage workdir whose newest checkpoint holds ``base_dir``'s parameters plus noise (with
    ``rank``: a LoRA run, its checkpoint holding the factors only, B non-zero)."""
    model, tokenizer, info = hf.load_pretrained(base_dir)
    hf.export_pretrained(model, tokenizer, path / "base_model", info=info)
    if rank:
        config = lora.LoRAConfig(rank=rank, alpha=2.0 * rank)
        lora.inject(model, config, rngs=nnx.Rngs(seed))
        (path / LORA_FILE).write_text(config.to_json())
    model_fn, params = ModelFn.from_module(model)
    trained, _ = model_fn.split_params(params)
    ckpt = Checkpointer(path / "checkpoints", every_steps=1, async_save=False)
    ckpt.save(3, {"params": _perturbed(trained, seed)}, {}, force=True)
    ckpt.wait()
    ckpt.close()
    return path


@pytest.fixture(scope="module")
def stages(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return {
        "pre": _fake_workdir(root / "pre", tiny_model_dir, 1),
        "ft": _fake_workdir(root / "ft", tiny_model_dir, 2),
        "lora": _fake_workdir(root / "lora", tiny_model_dir, 3, rank=2),
    }


def _export(workdir, out, *extra) -> int:
    return cli.main(["export", "--workdir", str(workdir), "--output", str(out), *extra])


@pytest.fixture(scope="module")
def plain(stages, tmp_path_factory):
    """Each workdir's plain export (LoRA: merged by the exporter)."""
    root = tmp_path_factory.mktemp("plain")
    for name, workdir in stages.items():
        assert _export(workdir, root / name) == 0
    return root


def _tensors(directory) -> dict[str, np.ndarray]:
    return load_file(str(pathlib.Path(directory) / "model.safetensors"))


def _assert_mix(mixed_dir, own_dir, partner_dir, w: float) -> None:
    """Every tensor is the float32 rounding of the float64 (1 - w)·own + w·partner."""
    mixed, own, partner = _tensors(mixed_dir), _tensors(own_dir), _tensors(partner_dir)
    assert set(mixed) == set(own) == set(partner)
    moved = 0
    for name, m in mixed.items():
        ref = (1 - w) * own[name].astype(np.float64) + w * partner[name].astype(np.float64)
        assert m.dtype == own[name].dtype, name
        # One rounding to float32: half an ulp, <= eps32/2 · |ref| (tiny: subnormals).
        tol = 0.5 * EPS32 * np.abs(ref) + np.finfo(np.float32).tiny
        np.testing.assert_array_less(np.abs(m.astype(np.float64) - ref), tol + 1e-300, name)
        moved += int(np.any(np.abs(m.astype(np.float64) - own[name]) > tol))
    assert moved > len(mixed) // 2  # not the own model passed through


def test_interpolated_export_is_the_float64_mix_of_both_models(stages, plain, tmp_path):
    out = tmp_path / "mixed"
    assert _export(stages["ft"], out, "--interpolate", "pre=0.3") == 0
    _assert_mix(out, plain / "ft", plain / "pre", 0.3)
    # Only the weights are mixed: the own export's config and sentence-transformers files.
    for name in ("config.json", "modules.json", "config_sentence_transformers.json"):
        assert (out / name).read_text() == (plain / "ft" / name).read_text()
    # The partner as a directory (its plain export) and as "stage:pre" give the same tensors.
    again = tmp_path / "again"
    assert _export(stages["ft"], again, "--interpolate", f"{plain / 'pre'}=0.3") == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_interpolated_export_embeds_alike_in_sentence_transformers_and_encode(stages, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "mixed"
    assert _export(stages["ft"], out, "--interpolate", "stage:pre=0.5") == 0
    theirs = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_numpy=True)
    source, npy = tmp_path / "texts.txt", tmp_path / "emb.npy"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    argv = ["encode", "--model", str(out), "--input", str(source), "--output", str(npy)]
    assert cli.main(argv) == 0
    ours = np.load(npy)
    assert ours.shape == theirs.shape
    # float32 encoders over a 2-layer, 32-wide model: a few ulps per coordinate.
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_weight_zero_is_the_plain_export_bit_for_bit(stages, plain, tmp_path):
    out = tmp_path / "w0"
    assert _export(stages["ft"], out, "--interpolate", "pre=0") == 0
    assert (out / "model.safetensors").read_bytes() == (
        plain / "ft" / "model.safetensors"
    ).read_bytes()


def test_a_lora_run_is_merged_before_it_is_mixed(stages, plain, tmp_path):
    assert (plain / "lora" / LORA_ADAPTER_DIR).is_dir()  # the plain export: merged + adapter
    out = tmp_path / "mixed"
    assert _export(stages["lora"], out, "--interpolate", "pre=0.4") == 0
    _assert_mix(out, plain / "lora", plain / "pre", 0.4)
    assert not (out / LORA_ADAPTER_DIR).exists()  # the adapter is not the mixed model's


def test_a_shape_mismatch_exits_2_with_one_line_naming_the_tensor(
    stages, minilm_dir, tmp_path, capsys
):
    other = tmp_path / "wider_mlp"
    config = EncoderConfig.from_hf({**TINY_BERT, "intermediate_size": 48})
    model = BiEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(0))
    hf.export_pretrained(model, hf.load_tokenizer(minilm_dir), other)
    capsys.readouterr()
    out = tmp_path / "mixed"
    assert _export(stages["ft"], out, "--interpolate", f"{other}=0.5") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "intermediate" in err and "(64,)" in err and "(48,)" in err
    assert not out.exists()


@pytest.mark.parametrize("arg", ["pre=1.5", "pre", "=0.3", "pre=x", "nowhere=0.3"])
def test_a_bad_interpolate_argument_exits_2_with_one_line(stages, tmp_path, capsys, arg):
    out = tmp_path / "mixed"
    assert _export(stages["ft"], out, "--interpolate", arg) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gte-jax export: error:"), err
    assert not out.exists()


def test_partner_resolution(stages, tmp_path):
    ft = stages["ft"]
    assert interpolation_partner("pre", ft) == stages["pre"]
    assert interpolation_partner("stage:pre", ft) == stages["pre"]
    assert interpolation_partner(str(stages["lora"]), ft) == stages["lora"]
    with pytest.raises(FileNotFoundError, match="stage:nope"):
        interpolation_partner("stage:nope", ft)


def test_the_config_keys_are_checked_at_start_up():
    c = stage_config("ft")
    c.export.interpolate_weight = 1.5
    assert any("export.interpolate_weight=1.5" in p for p in range_problems(c))
    c.export.interpolate_weight = 0.3
    assert "export.interpolate_from" in interpolate.config_problems(c.export)[0]
    c.export.interpolate_from = "stage:later"
    assert interpolate.config_problems(c.export) == []
    assert interpolate.from_config(c.export) == interpolate.Interpolation("stage:later", 0.3)
    config = ml_collections.ConfigDict()
    config.stages = ["pre", "ft", "later"]
    config.pre, config.ft, config.later = stage_config("pre"), c, stage_config("later")
    problems = interpolate.stage_problems(config)
    assert len(problems) == 1 and problems[0].startswith("ft.export.interpolate_from='stage:later'")


def test_mix_params_reference_and_tree():
    own = {"a": {"0": np.float32([1.0, 2.0])}, "b": np.float32([[3.0]])}
    partner = {"a": {"0": np.float32([5.0, -2.0])}, "b": np.float32([[1.0]])}
    mixed = interpolate.mix_params(own, partner, 0.25)
    np.testing.assert_array_equal(mixed["a"]["0"], np.float32([2.0, 1.0]))
    np.testing.assert_array_equal(mixed["b"], np.float32([[2.5]]))
    with pytest.raises(interpolate.InterpolationError, match="tensor a/0 is missing"):
        interpolate.mix_params(own, {"b": partner["b"]}, 0.5)
    assert json.dumps(interpolate.parse("a=b=0.5").__dict__) == '{"partner": "a=b", "weight": 0.5}'


def test_models_of_two_families_are_refused():
    from gte_jax.models.registry import config_from_hf

    def abstract(config):  # shapes only: the family is refused before any weight is read
        return nnx.eval_shape(
            lambda: BiEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(0))
        )

    t5_hf = {"model_type": "t5", "vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32}
    t5 = abstract(config_from_hf({**t5_hf, "num_layers": 1, "num_heads": 2}))
    with pytest.raises(interpolate.InterpolationError, match="one family"):
        interpolate.mix_models(abstract(EncoderConfig.from_hf(TINY_BERT)), t5, 0.5)


@pytest.mark.parametrize("name", ["ft", "lora"])
def test_export_on_several_devices_loads_split_and_writes_the_one_device_bytes(
    name, stages, plain, tmp_path, monkeypatch
):
    """`gte-jax export --workdir` on its own, with 8 devices: the model is loaded split over them
    (no device holds more than a quarter of the model plus a layer, the bound of the end-of-stage
    export's sharded load; the one-device path puts it all on one) and the files are the one-device
    export's, byte for byte (LoRA: merged)."""
    from gte_jax import workdir as wd

    assert jax.device_count() == 8
    one = tmp_path / "one"
    with jax.default_device(jax.devices()[0]):
        wd.export_workdir(stages[name], one)  # shardings_of=None: the model on one device
    loaded = []
    checkpoint_model = wd._checkpoint_model

    def recording(*args, **kwargs):
        out = checkpoint_model(*args, **kwargs)
        loaded.append(out[0])
        return out

    monkeypatch.setattr(wd, "_checkpoint_model", recording)
    assert _export(stages[name], tmp_path / "split") == 0
    sizes = {k: v.nbytes for k, v in _tensors(one).items()}
    layer = sum(v for k, v in sizes.items() if ".layer.0." in k)
    held: dict = {}
    for x in jax.tree.leaves(nnx.state(loaded[0], nnx.Param)):
        # the checkpoint's leaves come as host arrays (the end-of-stage export's rule);
        # base_model/'s (a LoRA run's frozen base) split over the devices
        for shard in getattr(x, "addressable_shards", ()):
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    assert max(held.values(), default=0) <= sum(sizes.values()) // 4 + layer, held
    assert name != "lora" or len(held) == 8  # the frozen base is on the devices, split
    for f in sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file()):
        if f.name != "README.md":  # the card names its output directory
            assert (one / f).read_bytes() == (tmp_path / "split" / f).read_bytes(), f
