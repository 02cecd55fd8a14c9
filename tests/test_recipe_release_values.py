"""The LLM2Vec and INSTRUCTOR recipes hold the values their releases train with, and the config
line of each such value says "release".

The expected values are read off the authors' code, named per value: LLM2Vec
(McGill-NLP/llm2vec: train_configs/*/MetaLlama3.json, experiments/run_*.py, llm2vec/llm2vec.py),
INSTRUCTOR (xlang-ai/instructor-embedding: train.py and the README's train command), and HF's
TrainingArguments defaults where those set nothing (AdamW: weight_decay 0.0, adam_epsilon 1e-8,
betas (0.9, 0.999), max_grad_norm 1.0, lr_scheduler_type "linear", warmup_ratio 0.0)."""

from __future__ import annotations

import importlib.util
import inspect
import pathlib

import pytest

from gte_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]

TRAINER_DEFAULTS = {
    "train.weight_decay": 0.0,
    "train.adam_eps": 1e-8,
    "train.adam_b1": 0.9,
    "train.adam_b2": 0.999,
    "train.max_grad_norm": 1.0,
    "train.schedule": "linear",
}

LLM2VEC = {
    "mntp": {
        **TRAINER_DEFAULTS,
        "train.learning_rate": 5e-5,  # Trainer's default (train_configs/mntp sets none)
        "train.warmup_ratio": 0.0,
        "train.batch_size": 32,
        "data.max_length": 512,
        "mntp.mask_probability": 0.2,
        "model.lora.rank": 16,
        "model.lora.alpha": 32.0,  # run_mntp.py: lora_alpha = 2 * lora_r
        "model.lora.dropout": 0.05,
    },
    "simcse": {
        **TRAINER_DEFAULTS,
        "train.learning_rate": 3e-5,
        "train.warmup_ratio": 0.0,
        "train.batch_size": 128,
        "data.max_length": 128,
        "model.attention_dropout": 0.3,
        "loss.name": "infonce",  # HardNegativeNLLLoss: q -> every positive (and negative)
        "loss.symmetric": False,
        "loss.temperature": 1 / 20,  # loss_scale 20
    },
    "supervised": {
        **TRAINER_DEFAULTS,
        "train.learning_rate": 2e-4,
        "train.warmup_steps": 300,
        "data.max_length": 512,
        "loss.name": "infonce",
        "loss.symmetric": False,
        "loss.temperature": 1 / 50,  # run_supervised.py's loss_scale default; the JSON sets none
        "model.include_prompt": "false",  # LLM2Vec(skip_instruction=True)
        "data.mixed_batches": False,  # E5Data: one dataset per batch
    },
}

INSTRUCTOR = {
    **TRAINER_DEFAULTS,
    "loss.name": "instructor",  # InstructorTrainer.compute_loss
    "loss.temperature": 0.1,  # README: --cl_temperature 0.1
    "train.learning_rate": 2e-5,
    "train.warmup_ratio": 0.1,
    "train.epochs": 10.0,
    "data.query_max_length": 512,  # --max_source_length 512
    "model.include_prompt": "false",  # instruction_mask
    "data.mixed_batches": False,  # compute_loss asserts one task per batch
}


def _get(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def _same(got, want) -> bool:
    if isinstance(want, float):
        return got == pytest.approx(want, rel=1e-12)
    return got == want


def _assert_values(config, expected: dict, where: str) -> None:
    wrong = {
        key: (_get(config, key), want)
        for key, want in expected.items()
        if not _same(_get(config, key), want)
    }
    assert not wrong, f"{where}: (recipe, release) {wrong}"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_labelled_release(source: str, expected: dict, where: str) -> None:
    """Each key's assignment line, or the comment lines just above it, says "release"."""
    lines = source.splitlines()
    for key in expected:
        attr = "c." + key + " = "
        hits = [i for i, line in enumerate(lines) if line.strip().startswith(attr)]
        if not hits:  # set by a helper, e.g. _lora's "c.model.lora.rank = rank"
            continue
        i = hits[0]
        above = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            above.append(lines[j])
            j -= 1
        assert "release" in lines[i] + " ".join(above), f"{where}: {lines[i].strip()!r}"


@pytest.mark.parametrize("stage", sorted(LLM2VEC))
def test_llm2vec_stages_hold_the_release_values(stage):
    llm2vec = _module("llm2vec")
    config = load_config(f"{REPO / 'configs' / 'llm2vec.py'}:supervised")
    _assert_values(config[stage], LLM2VEC[stage], f"llm2vec {stage}")
    source = inspect.getsource(getattr(llm2vec, f"{stage}_stage")) + inspect.getsource(
        llm2vec._common
    )
    _assert_labelled_release(source, LLM2VEC[stage], f"llm2vec {stage}")


def test_instructor_holds_the_release_values():
    instructor = _module("instructor")
    config = load_config(str(REPO / "configs" / "instructor.py"))
    _assert_values(config, INSTRUCTOR, "instructor")
    source = inspect.getsource(instructor.get_config).split('if arg == "runlocal"')[0]
    _assert_labelled_release(source, INSTRUCTOR, "instructor")
