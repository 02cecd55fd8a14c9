"""Config loading and --config.a.b=v overrides."""

from __future__ import annotations

import pathlib
import textwrap

import pytest

from gte_jax.config import ConfigError, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize(
    "override, hint",
    [
        ("--config.train.learnig_rate=1", "did you mean 'train.learning_rate'?"),
        ("--config.trian.learning_rate=1", "did you mean 'train'?"),
        ("--config.model.poolling=cls", "did you mean 'model.pooling'?"),
        ("--config.zzzq=1", "known fields here: ['checkpoint', 'data'"),  # nothing close
    ],
)
def test_unknown_override_names_the_closest_key(override, hint):
    """What the README promises: the misspelt key's closest known key, with its full path."""
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "finetune.py", [override])
    assert hint in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.py")


def test_training_configs_are_checked_against_the_one_schema(tmp_path):
    """A misspelt or mistyped key in a recipe file is refused when the config loads."""
    path = tmp_path / "recipe.py"
    body = """
from gte_jax.defaults import stage_config

def get_config(arg=None):
    c = stage_config("ft")
    if arg == "typo":
        c.train.learing_rate = 1e-4
    if arg == "type":
        c.train.batch_size = "64"
    if arg == "stages":
        import ml_collections
        root = ml_collections.ConfigDict()
        root.stages = ["a"]
        root.a = c
        c.loss.temprature = 0.05
        return root
    return c
"""
    path.write_text(body)
    load_config(path)
    with pytest.raises(
        ConfigError, match=r"'train.learing_rate' \(did you mean train.learning_rate"
    ):
        load_config(f"{path}:typo")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(f"{path}:type")
    with pytest.raises(ConfigError, match="'a.loss.temprature'"):
        load_config(f"{path}:stages")


def test_main_fields_table_matches_the_defaults():
    """Every key in the main-fields table (docs/recipes.md) exists, with the default it states."""
    import pathlib
    import re

    from gte_jax.defaults import stage_config

    readme = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    table = readme.split("| field | default | meaning |", 1)[1].split("\n\n", 1)[0]
    defaults = stage_config()
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert len(rows) >= 10
    for row in rows:
        field, default = (c.strip() for c in row.strip("|").split("|")[:2])
        keys = re.findall(r"`([a-z_]+\.[a-z_.]+)`", field)
        values = [v.strip().strip("`") for v in re.split(r" / |, ", default)]
        assert keys, row
        for i, key in enumerate(keys):
            node = defaults
            for part in key.split("."):
                assert part in node, f"README config table: {key} is not in gte_jax/defaults.py"
                node = node[part]
            if len(values) == len(keys) and values[i] not in ("—", ""):
                assert str(node).lower() == values[i].lower() or (
                    isinstance(node, float) and float(values[i]) == node
                ), f"README says {key} defaults to {values[i]}, defaults.py says {node!r}"
