"""One step builder for ``train`` and ``plan`` (gte_jax/training/step.py): from one config on the
8 fake CPU devices, the step lowered the way ``train`` sets it up (the model loaded from its
directory, the state placed on its shards, a global batch) and the way ``gte-jax plan`` does
(abstract model, state and batch from the config's shapes) is the same program, HLO text for
HLO text; a change of τ or of the GradCache chunk count changes it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gte_jax import plan
from gte_jax import sharding as shd
from gte_jax.defaults import stage_config
from gte_jax.training import checks
from gte_jax.training.setup import initial_training, load_model_for_training
from gte_jax.training.step import build_train_step


def _config(model_dir, **train):
    c = stage_config("step")
    c.model.init_from = str(model_dir)
    c.model.dtype = "float32"  # plan's "auto" is the TPU's bf16; the CPU's is float32
    c.data.query_max_length, c.data.doc_max_length = 16, 24
    c.data.sources = [{"name": "pairs", "path": "/nowhere/pairs.jsonl", "num_negatives": 1}]
    c.train.batch_size, c.train.num_steps = 16, 10
    c.train.gradcache, c.train.gradcache_chunk_size = True, 8
    c.train.update(train)
    return c


def _as_train_does(config):
    """The step of ``train``'s setup (gte_jax/training/setup.py), lowered for a global batch."""
    mesh = checks.run_mesh(config)
    num_chunks = checks.check_config(config, mesh)
    model, _, _ = load_model_for_training(config.model)
    total_steps = int(config.train.num_steps)
    model_fn, tx, schedule, state, _ = initial_training(config, model, mesh, total_steps)
    step = build_train_step(config, mesh, model_fn, tx, schedule, state, num_chunks=num_chunks)
    shapes, _, _ = plan.batch_shapes(config)
    local = {k: np.zeros(shape, np.int32) for k, shape in shapes.items()}
    return step.lower(state, shd.global_batch(local, mesh)).as_text()


def _as_plan_does(config):
    mesh = checks.run_mesh(config)
    hf_config, _ = plan.model_shape(config.model, None)
    step = plan.abstract_step(config, mesh, hf_config)
    return step.train_step.lower(step.state, step.batch).as_text()


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """The HLO of the step ``train`` runs for :func:`_config` (lowered once for the module)."""
    assert len(jax.devices()) == 8
    return _as_train_does(_config(tiny_model_dir))


def test_train_and_plan_lower_the_same_step(tiny_model_dir, trained):
    # The batch (and the state's shardings) are laid out over the 8 devices' "data" axis.
    assert "mhlo.num_partitions = 8" in trained and '{"data"}' in trained
    assert _as_plan_does(_config(tiny_model_dir)) == trained


@pytest.mark.parametrize(
    "change",
    # batch 16 over 8 devices: a 16-row chunk is one chunk instead of two
    [{"loss.temperature": 0.02}, {"train.gradcache_chunk_size": 16}],
    ids=["temperature", "chunks"],
)
def test_another_setting_lowers_another_step(tiny_model_dir, trained, change):
    changed = _config(tiny_model_dir)
    for key, value in change.items():
        group, name = key.split(".")
        changed[group][name] = value
    assert _as_plan_does(changed) != trained
