"""Weights at 7B on 8 fake devices: the sharded load equals ``hf.load_model`` bit for bit, reads
only the slices the devices hold; the export streams tensor by tensor and writes the very bytes
of the whole-model export; in-training eval runs on the sharded parameters and equals the
replicated eval.

The memory bound (issue: weights at 7B): per device, and per host buffer, at most 1/4 of the whole
model + one layer. Measured from the arrays themselves: the bytes of each device's addressable
shards, the size of every array the slice reader returns and every array the export brings to
the host (``memory_stats`` is None on the CPU backend)."""

from __future__ import annotations

import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save as safetensors_save
from tiny_models import tiny_decoder_dir, tiny_tokenizer

from gte_jax import hf, sharded_io
from gte_jax import sharding as shd
from gte_jax.encode import Embedder
from gte_jax.evaluation import EvalSuite


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh(8, 1)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    # Four layers, so that a layer is well under 1/4 of the model, and weights in two files with
    # an index (the loader reads each tensor from its own file).
    return tiny_decoder_dir(
        tmp_path_factory.mktemp("weights"), "mistral", causal_lm=False, num_hidden_layers=4,
        max_shard_size="60KB",
    )  # fmt: skip


def _fsdp(mesh):
    return lambda abstract: sharded_io.param_shardings(abstract, mesh, "fsdp")


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _leaves(tree) -> dict[str, object]:
    return {shd.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("which", ["mistral", "bert"])
def test_sharded_load_is_load_model_bitwise(which, scan_layers, mistral_dir, minilm_dir, mesh):
    """Every leaf bitwise today's (hf.load_model), on the train state's shardings; the info too
    (the BERT pooler is carried as today)."""
    path = mistral_dir if which == "mistral" else minilm_dir
    assert which == "bert" or (path / hf.SAFETENSORS_INDEX).exists()
    ref, ref_info = hf.load_model(path, host=True, scan_layers=scan_layers)
    got, info = sharded_io.load_model_sharded(path, _fsdp(mesh), scan_layers=scan_layers)
    want_shardings = _leaves(sharded_io.param_shardings(_params(ref), mesh, "fsdp"))
    ref_leaves, got_leaves = _leaves(_params(ref)), _leaves(_params(got))
    assert ref_leaves.keys() == got_leaves.keys()
    for name, want in ref_leaves.items():
        have = got_leaves[name]
        assert have.dtype == want.dtype and have.shape == want.shape, name
        assert np.array_equal(np.asarray(have), want), name
        assert have.sharding == want_shardings[name], name
    assert sorted(info.extra_tensors) == sorted(ref_info.extra_tensors)
    for k, v in ref_info.extra_tensors.items():
        assert np.array_equal(info.extra_tensors[k], v)
    assert (info.max_seq_length, info.include_prompt) == (
        ref_info.max_seq_length,
        ref_info.include_prompt,
    )


class RecordingFiles(sharded_io.TensorFiles):
    """The slice reader, recording the size of every array it returns."""

    reads: list[int] = []

    def read(self, name, index):
        array = super().read(name, index)
        type(self).reads.append(array.nbytes)
        return array


class WholeTensorFiles(RecordingFiles):
    """A mutant: reads each tensor whole, then cuts the slice (what must fail the bound)."""

    def read(self, name, index):
        whole = sharded_io.TensorFiles.read(self, name, tuple(slice(None) for _ in index))
        type(self).reads.append(whole.nbytes)
        return whole[index]


def _model_bytes(model) -> tuple[int, int]:
    """(the whole model's bytes, one layer's bytes), from the parameters' shapes."""
    leaves = _leaves(_params(model))
    total = sum(x.nbytes for x in leaves.values())
    config = model.config
    layer = sum(x.nbytes for k, x in leaves.items() if "/layers/" in k) // config.num_hidden_layers
    return total, layer


def _bound_holds(files, path, mesh, scan_layers) -> tuple[int, int, int, int]:
    files.reads = []
    model, _ = sharded_io.load_model_sharded(
        path, _fsdp(mesh), files=files, scan_layers=scan_layers
    )
    total, layer = _model_bytes(model)
    bound = total // 4 + layer
    held: dict[object, int] = {}
    for x in jax.tree.leaves(_params(model)):
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    assert max(held.values()) <= bound, (held, bound)
    assert max(files.reads) <= bound
    # Every byte read lands on a device that holds it: a host with k of the devices reads only
    # what they hold (here one process holds all 8).
    assert sum(files.reads) <= sum(held.values()), (sum(files.reads), sum(held.values()))
    return total, layer, max(held.values()), sum(files.reads)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_load_memory_bound(scan_layers, mistral_dir, mesh):
    total, layer, per_device, _ = _bound_holds(RecordingFiles, mistral_dir, mesh, scan_layers)
    assert per_device < total // 4  # FSDP over 8: each device holds ~1/8 (vectors replicated)
    with pytest.raises(AssertionError):  # the mutation check: whole-tensor reads break it
        _bound_holds(WholeTensorFiles, mistral_dir, mesh, scan_layers)


def test_frozen_base_straight_to_bfloat16(mistral_dir, mesh):
    """A frozen LoRA base in bfloat16: each slice cast once, the values float32's rounding."""
    ref, _ = hf.load_model(mistral_dir, host=True)
    got, _ = sharded_io.load_model_sharded(
        mistral_dir, _fsdp(mesh), param_dtype=lambda path: ml_dtypes.bfloat16
    )
    ref_leaves = _leaves(_params(ref))
    for name, have in _leaves(_params(got)).items():
        assert have.dtype == ml_dtypes.bfloat16
        want = ref_leaves[name].astype(ml_dtypes.bfloat16)
        assert np.array_equal(np.asarray(have).view(np.uint16), want.view(np.uint16)), name


def test_streamed_safetensors_are_safetensors_bytes(tmp_path):
    """The streaming writer writes what safetensors.numpy.save writes (today's writer), for
    every dtype mix, names that sort by dtype first, a 0-d and an empty tensor."""
    rng = np.random.default_rng(0)
    tensors = {
        "b.weight": rng.normal(size=(3, 5)).astype(np.float32),
        "a": rng.normal(size=(7,)).astype(np.float16),
        "é.x": np.arange(4, dtype=np.int64),
        "z": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16),
        "c": np.zeros((0, 3), np.float32),
        "s": np.array(3.0, np.float32),
    }
    for k in range(1, len(tensors) + 1):
        part = dict(list(tensors.items())[:k])
        hf._save_tensors(part, hf.epath.Path(tmp_path / "x.safetensors"))
        assert (tmp_path / "x.safetensors").read_bytes() == safetensors_save(
            part, metadata={"format": "pt"}
        ), k


@pytest.mark.parametrize("scan_layers", [False, True])
def test_export_tensor_by_tensor_is_todays_export(
    scan_layers, mistral_dir, mesh, tmp_path, monkeypatch
):
    """The export of the sharded model: the files of the host model's export, byte for byte
    (sharded shards too), and no array brought to the host bigger than the bound."""
    tok = tiny_tokenizer()
    host, info = hf.load_model(mistral_dir, host=True, scan_layers=scan_layers)
    sharded, info2 = sharded_io.load_model_sharded(
        mistral_dir, _fsdp(mesh), scan_layers=scan_layers
    )
    hf.export_pretrained(host, tok, tmp_path / "today", info=info, max_shard_size=40_000)
    fetched: list[int] = []

    def recording(x):
        value = shd.host_value(x)
        fetched.append(value.nbytes)
        return value

    monkeypatch.setattr(hf, "host_value", recording)
    hf.export_pretrained(sharded, tok, tmp_path / "sharded", info=info2, max_shard_size=40_000)
    total, layer = _model_bytes(host)
    assert fetched and max(fetched) <= total // 4 + layer
    # Every tensor once (a stacked leaf row by row): the sum is the model, never more.
    assert sum(fetched) == total
    files = sorted(p.relative_to(tmp_path / "today") for p in (tmp_path / "today").rglob("*"))
    assert [p.name for p in files if p.suffix == ".safetensors"][1:]  # written as shards
    for rel in files:
        if (tmp_path / "today" / rel).is_file():
            assert (tmp_path / "today" / rel).read_bytes() == (
                tmp_path / "sharded" / rel
            ).read_bytes(), rel
    # A process that does not write walks the same tensors and writes nothing.
    fetched.clear()
    hf.export_pretrained(sharded, tok, tmp_path / "none", info=info2, write=False)
    assert sum(fetched) == total and not (tmp_path / "none").exists()


def test_sharded_eval_is_todays_eval(mistral_dir, mesh, tmp_path):
    """In-training eval on the FSDP-sharded parameters (batches over "data", no gathered copy)
    equals the eval of the same model on one device, within float32 rounding of the forward
    pass; the parameters stay where they are."""
    tok = tiny_tokenizer()
    texts = [f"text {i}: " + "word " * (i % 7) for i in range(24)]
    host, _ = hf.load_model(mistral_dir, scan_layers=True)
    sharded, _ = sharded_io.load_model_sharded(mistral_dir, _fsdp(mesh), scan_layers=True)
    want = Embedder(host, tok).encode(texts, batch_size=8)
    embedder = Embedder(sharded, tok, mesh=mesh)
    got = embedder.encode(texts, batch_size=8)
    # Reductions of length <= intermediate size, per layer: float32 eps x that x layers.
    config = host.config
    tol = np.finfo(np.float32).eps * config.intermediate_size * config.num_hidden_layers
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    leaves = jax.tree.leaves(_params(sharded))
    assert all(len(x.sharding.device_set) == 8 for x in leaves)
    assert any(not x.sharding.is_fully_replicated for x in leaves)
    # Through EvalSuite's mesh argument (what the Evaluator passes): the same figures.
    sts = tmp_path / "sts.jsonl"
    sts.write_text(
        "\n".join(
            f'{{"sentence1": "{a}", "sentence2": "{b}", "score": {s}}}'
            for a, b, s in zip(texts[:12], texts[12:], range(12), strict=True)
        )
        + "\n"
    )
    suite = EvalSuite([{"name": "s", "kind": "sts", "path": str(sts)}], batch_size=8)
    assert suite(sharded, tok, mesh=shd.mesh_of(_params(sharded))) == pytest.approx(
        suite(host, tok), abs=1e-6
    )


def test_place_keeps_loaded_shards(mistral_dir, mesh):
    """The train state's placement keeps a parameter already on its shardings (no host copy)."""
    got, _ = sharded_io.load_model_sharded(mistral_dir, _fsdp(mesh))
    params = _params(got)
    shardings = sharded_io.param_shardings(params, mesh, "fsdp")
    placed = shd.place(params, shardings)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(placed), strict=True):
        assert a is b


def test_gcs_style_paths_copy_down(mistral_dir, tmp_path, monkeypatch):
    """A remote directory's weight files are streamed to a local cache, then read by slice."""
    monkeypatch.setattr(hf, "is_local", lambda path: False)
    files = sharded_io.TensorFiles(mistral_dir, cache_dir=str(tmp_path))
    assert sorted(p.name for p in pathlib.Path(tmp_path).iterdir()) == sorted(
        p.name for p in mistral_dir.glob("*.safetensors")
    )
    name = files.names()[0]
    whole = files.read_all(name)
    assert whole.shape == files.shape(name)
