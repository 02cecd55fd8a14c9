"""launch/colab.ipynb runs top to bottom (tiny model, a few steps) and its export loads in
sentence-transformers with the embeddings gte-jax computes."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from conftest import child_xla_flags

from gte_jax.data.pipeline import DEMO_DIR

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "launch" / "colab.ipynb"
STEPS = 3


def _kernel_or_fail() -> None:
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError as e:
        pytest.fail(f"{e}: the notebook test needs nbclient, nbformat and ipykernel: "
                    "pip install -e .[test]")  # fmt: skip
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail("no 'python3' Jupyter kernel: pip install -e .[test] (ipykernel provides it)")


def test_committed_notebook_has_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"
    # The bundled data comes from the installed package, not from paths relative to the checkout.
    source = "\n".join(c.source for c in code)
    assert "DEMO_DIR" in source and "resources/demo" not in source


@pytest.fixture(scope="module")
def executed(tiny_model_dir, tmp_path_factory):
    _kernel_or_fail()
    import nbclient
    import nbformat

    cwd = tmp_path_factory.mktemp("notebook_cwd")
    env = {
        "GTE_JAX_NOTEBOOK_TEST": "1",
        "GTE_JAX_NOTEBOOK_MODEL": str(tiny_model_dir),
        "GTE_JAX_NOTEBOOK_STEPS": str(STEPS),
        "GTE_JAX_NOTEBOOK_BATCH_SIZE": "8",
        "GTE_JAX_NOTEBOOK_MAX_LENGTH": "32",  # one padded length: the train step compiles once
        "GTE_JAX_NOTEBOOK_LR": "1e-3",  # a few steps that visibly move the tiny model
        # The kernel is a new process: one CPU device (not conftest's 8) at the session's
        # backend optimisation level, no network.
        "XLA_FLAGS": child_xla_flags(1),
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("GTE_JAX_NOTEBOOK_WORKDIR", raising=False)
        nbclient.NotebookClient(
            nb,
            kernel_name="python3",
            timeout=120,  # per cell
            resources={"metadata": {"path": str(cwd)}},  # the kernel's working directory
        ).execute()
    return nb, cwd


def test_notebook_runs_and_exports_a_sentence_transformers_model(executed):
    from sentence_transformers import SentenceTransformer

    from gte_jax.encode import Embedder

    nb, cwd = executed
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "GTE_JAX_NOTEBOOK_TEST=1: not installing anything" in text
    assert "query_input_ids" in text and "negative:" in text  # the batch cell decoded a batch

    # The default workdir is relative to the kernel's working directory.
    workdir = cwd / "gte_jax_colab_run"
    results = json.loads((workdir / "notebook_results.json").read_text())
    assert results["steps"] == STEPS and np.isfinite(results["final_loss"])
    export = pathlib.Path(results["export_dir"])
    assert export == workdir / "export"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == STEPS
    for when in ("before", "after"):
        assert all(0.0 <= v <= 1.0 for v in results[when].values()), results[when]
    assert results["st_max_abs_diff"] < 1e-4

    # Independently of the notebook: the export loads in sentence-transformers and matches ours.
    texts = ["And God said, Let there be light.", "Noah built an ark.", ""]
    st = SentenceTransformer(str(export), device="cpu").encode(texts, convert_to_numpy=True)
    ours = Embedder.from_pretrained(export).encode(texts)
    np.testing.assert_allclose(st, ours, atol=1e-5)
    # ... and it carries the training: the embeddings differ from the untrained model's.
    base = Embedder.from_pretrained(workdir / "base_model").encode(texts)
    assert np.abs(base - ours).max() > 1e-4

    # The retrieval demo ranked real corpus ids, best first, for every query.
    corpus = (DEMO_DIR / "bible_eval" / "corpus.jsonl").read_text(encoding="utf-8")
    corpus_ids = {json.loads(line)["_id"] for line in corpus.splitlines() if line.strip()}
    assert len(results["retrieval"]) == 4
    for r in results["retrieval"]:
        assert len(r["top"]) == 3 and set(r["top"]) <= corpus_ids
