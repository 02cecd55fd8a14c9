"""Replay (``data.replay``): a share of a stage's batches drawn from an earlier stage's sources
through the α-mixture, one source per batch. The realised share is checked against the binomial
law of the configured one (scipy), a resume mid-stage against the uninterrupted stream bit for
bit, refusals at start-up, and a two-stage run's summary and interpolated export."""

from __future__ import annotations

import json
import pathlib

import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy import stats

from gte_jax import cli, plan, train
from gte_jax.data.cli import training_data_config
from gte_jax.data.mixture import REPLAY_PREFIX, mixture_weights, replay_weights
from gte_jax.data.pipeline import (
    DEMO_DIR,
    build_iterator,
    build_sources,
    load_tokenizer,
    replay_problems,
    resolve_replay,
)
from gte_jax.defaults import stage_config
from gte_jax.errors import ConfigError
from gte_jax.ranges import range_problems
from gte_jax.training import loop
from gte_jax.workdir import export_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
BIBLE = {"name": "bible", "path": str(DEMO_DIR / "bible_finetune.jsonl")}
CHAT = {"name": "chat", "path": str(DEMO_DIR / "chat_qa.jsonl"), "query_prefix": "query: "}
VERSES = {"name": "verses", "path": str(DEMO_DIR / "bible_kjv_web_ot.jsonl")}
P_TAIL = 1e-6  # chance that a correct sampler fails a binomial / chi-square check


def _data(share: float, *, replayed=(CHAT, VERSES), batch_size: int = 4):
    data = stage_config("ft").data
    data.sources = [BIBLE]
    data.replay.share = share
    data.replay.sources = [dict(s) for s in replayed]
    data.batch_size = batch_size
    data.query_max_length = data.doc_max_length = 32
    return data


def _iterator(data, tokenizer):
    return build_iterator(data, tokenizer=tokenizer, sources=build_sources(data))


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(str(minilm_dir))


def test_replay_weights_split_the_share_by_n_to_the_alpha():
    sizes = {"a": 100, "b": 400, f"{REPLAY_PREFIX}x": 900, f"{REPLAY_PREFIX}y": 25}
    w = np.array(replay_weights(sizes, alpha=0.5, replay_alpha=1.0, share=0.3))
    own = 0.7 * np.sqrt([100.0, 400.0]) / (10 + 20)
    replayed = 0.3 * np.array([900.0, 25.0]) / 925
    np.testing.assert_allclose(w, np.concatenate([own, replayed]), rtol=1e-15)
    no_replay = replay_weights({"a": 100, "b": 400}, alpha=0.5, replay_alpha=0.5, share=0.0)
    np.testing.assert_allclose(no_replay, mixture_weights([100, 400], 0.5), rtol=1e-15)
    for share in (1.0, -0.1):
        with pytest.raises(ValueError, match="share"):
            replay_weights(sizes, alpha=0.5, replay_alpha=0.5, share=share)


def test_the_realised_share_of_replayed_batches_is_binomial(tokenizer):
    share, steps = 0.2, 20_000
    it = _iterator(_data(share), tokenizer)
    names = it.sampler.names
    assert names == ["bible", f"{REPLAY_PREFIX}chat", f"{REPLAY_PREFIX}verses"]
    drawn = np.bincount([it.sampler.source_of_step(t) for t in range(steps)], minlength=3)
    low, high = stats.binom.interval(1 - P_TAIL, steps, share)
    assert low <= drawn[1:].sum() <= high
    # Within the replayed share, the replayed stage's own α rule (data.alpha here: 0.5).
    sizes = np.array([320.0, 400.0, 400.0])
    expected = np.array([1 - share, *(share * np.sqrt(sizes[1:]) / np.sqrt(sizes[1:]).sum())])
    assert stats.chisquare(drawn, steps * expected).pvalue > P_TAIL


def test_resume_mid_stage_is_bitwise(tokenizer):
    data = _data(0.5)
    first = _iterator(data, tokenizer)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = _iterator(data, tokenizer)
    resumed.set_state(state)
    kinds = set()
    for step in range(5, 13):
        kinds.add(first.sampler.names[first.sampler.source_of_step(step)].startswith("replay/"))
        a, b = next(first), next(resumed)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step} {key}")
    assert kinds == {True, False}  # both own and replayed batches were compared
    # A resume with another share is refused (it would draw another stream).
    with pytest.raises(ValueError, match="mixture weights changed"):
        _iterator(_data(0.3), tokenizer).set_state(state)


def _two_stages(pre_steps: int = 2) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stages = ["pre", "ft"]
    config.pre, config.ft = stage_config("pre"), stage_config("ft")
    config.pre.data.sources = [CHAT]
    config.ft.data.sources = [BIBLE]
    config.ft.model.init_from = "stage:pre"
    config.ft.data.replay.stage = "pre"
    config.ft.data.replay.share = 0.5
    for c, steps in ((config.pre, pre_steps), (config.ft, 4)):
        c.data.query_max_length = c.data.doc_max_length = 32
        c.data.packing = True
        c.train.batch_size = 8
        c.train.num_steps = steps
        c.train.progress_bar = False
        c.checkpoint.async_save = False
        c.eval.at_start = False
    config.pre.export.enabled = False
    return config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stage": "nope"}, "ft.data.replay.stage='nope': not a stage of this config"),
        ({"stage": "ft"}, "cannot replay its own sources"),
        ({"sources": [BIBLE]}, "set either the stage or data.replay.sources"),
    ],
)
def test_replay_settings_that_cannot_work_are_refused_before_any_stage(change, message, tmp_path):
    config = _two_stages()
    config.ft.data.replay.update(change)
    assert any(message in p for p in replay_problems(config))
    with pytest.raises(train.TrainingError, match=message):
        loop.run(config, tmp_path / "w")
    assert not (tmp_path / "w" / "pre").exists()  # stage 1 did not run


def test_replay_refusals_of_the_data_config():
    data = _data(1.0)
    assert any(
        "data.replay.share=1.0: must be in [0, 1)" in p for p in range_problems({"data": data})
    )
    empty = _data(0.2, replayed=())
    with pytest.raises(ConfigError, match="no sources to replay"):
        build_sources(empty)
    empty.replay.stage = "pre"  # a single-stage config cannot resolve a stage
    with pytest.raises(ConfigError, match="multi-stage"):
        build_sources(empty)
    text = _data(0.2, replayed=({**CHAT, "kind": "text", "query_prefix": ""},))
    config = stage_config("ft")
    config.data = text
    assert any("text sources" in p for p in train.stage_kind_problems(config))


def test_the_train_command_refuses_an_unknown_replay_stage_with_exit_2(tmp_path, capsys):
    argv = ["train", "--config", str(REPO / "configs" / "demo.py"), "--workdir", str(tmp_path)]
    extra = ["--config.finetune.data.replay.stage=nope", "--config.finetune.data.replay.share=0.2"]
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert "finetune.data.replay.stage='nope'" in err
    assert not any(tmp_path.iterdir())


def test_resolving_a_stage_copies_its_sources_and_alpha():
    config = _two_stages()
    config.pre.data.alpha = 0.8
    data = config.ft.data.copy_and_resolve_references()
    resolve_replay(data, config)
    assert [dict(s) for s in data.replay.sources] == [CHAT]
    assert data.replay.alpha == 0.8
    assert [s.name for s in build_sources(data)] == ["bible", f"{REPLAY_PREFIX}chat"]
    # `gte-jax data inspect` and `gte-jax plan` resolve it as the run does.
    inspected = training_data_config(config, "ft", "config.py")
    assert [dict(s) for s in inspected.replay.sources] == [CHAT]
    planned = plan.stage_configs(config, "ft")[0]
    assert [dict(s) for s in planned.data.replay.sources] == [CHAT]
    config.ft.data.replay.stage = "nope"
    with pytest.raises(ConfigError, match="not a stage of this config"):
        resolve_replay(config.ft.data.copy_and_resolve_references(), config)


def test_a_run_reports_replayed_sources_and_exports_the_interpolated_mix(tiny_model_dir, tmp_path):
    """One stage with replayed sources listed (a resolved stage gives the same config: above)
    and the end-of-stage export interpolated with its base model (export.interpolate_*)."""
    config = _two_stages().ft
    config.model.init_from = str(tiny_model_dir)
    config.data.replay.stage = ""
    config.data.sources = [{**BIBLE, "num_negatives": 0}]  # as CHAT: one compiled step
    config.data.replay.sources = [CHAT]
    config.data.packing_row_length = 32  # one row length: the same
    config.export.interpolate_from = str(tiny_model_dir)
    config.export.interpolate_weight = 0.25
    config.model.dropout = 0.0  # replay, not dropout: its random bits are ~1/3 of a compile
    (summary,) = loop.run(config, tmp_path / "ft")
    assert summary["completed"] and summary["steps"] == 4
    sources = summary["sources"]
    assert set(sources) == {"bible", f"{REPLAY_PREFIX}chat"}
    assert sum(s["drawn_batches"] for s in sources.values()) == 4
    assert all(s["drawn_examples"] == 8 * s["drawn_batches"] for s in sources.values())
    on_disk = json.loads((tmp_path / "ft" / "summary.json").read_text())["sources"]
    assert on_disk == sources
    # The export's prompts are the stage's own sources' (CHAT's "query: " is a replayed one).
    st_config = tmp_path / "ft" / "export" / "config_sentence_transformers.json"
    assert not json.loads(st_config.read_text()).get("prompts")
    # The end-of-stage export is (1 - 0.25)·own + 0.25·base per tensor (float64 reference).
    own_dir = export_workdir(tmp_path / "ft", tmp_path / "own")[0]
    own = load_file(str(own_dir / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    mixed = load_file(str(tmp_path / "ft" / "export" / "model.safetensors"))
    assert set(mixed) == set(own) == set(base)
    for name, m in mixed.items():
        ref = 0.75 * own[name].astype(np.float64) + 0.25 * base[name].astype(np.float64)
        tol = 0.5 * np.finfo(np.float32).eps * np.abs(ref) + np.finfo(np.float32).tiny
        assert np.all(np.abs(m - ref) <= tol), name
