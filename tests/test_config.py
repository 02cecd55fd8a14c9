"""Config loading and --config.a.b=v overrides."""

from __future__ import annotations

import textwrap

import pytest

from gte_jax.config import ConfigError, load_config


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(
        textwrap.dedent(
            """
            import ml_collections

            def get_config(arg=None):
                c = ml_collections.ConfigDict()
                c.name = arg or "base"
                c.lr = 1e-3
                c.steps = 10
                c.flag = False
                c.dims = [1, 2]
                c.opt = None
                c.model = ml_collections.ConfigDict({"width": 8})
                c.sources = [{"name": "a", "prefix": ""}]
                return c
            """
        )
    )
    return path


def test_overrides_coerce_to_field_types(config_file):
    c = load_config(
        config_file,
        [
            "--config.lr=0.5",
            "--config.steps=7",
            "--config.flag=true",
            "--config.dims=3,4,5",
            "--config.model.width=16",
            "--config.sources.0.prefix=query: ",
            "--config.opt=[1, 'x']",
        ],
    )
    assert (c.lr, c.steps, c.flag, c.dims, c.model.width) == (0.5, 7, True, [3, 4, 5], 16)
    assert c.sources[0]["prefix"] == "query: "
    assert c.opt == [1, "x"]
    assert isinstance(c.lr, float) and isinstance(c.steps, int)
    assert load_config(f"{config_file}:small").name == "small"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.nope=1", "unknown config key 'nope'"),
        ("--config.model.depth=1", "unknown config key 'model.depth'"),
        ("--config.steps=ten", "expected an integer"),
        ("--config.flag=maybe", "expected a boolean"),
        ("--config.sources.3.prefix=x", "not an index"),
        ("--config.model=3", "group of fields"),
    ],
)
def test_bad_overrides_raise_clear_errors(config_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file, [override])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.py")
