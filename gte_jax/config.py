"""Config files and command-line overrides (big_vision style).

A config is a Python file defining ``get_config()`` (or ``get_config(arg)``, selected as
``path/to/config.py:arg``) that returns an ``ml_collections.ConfigDict``. Overrides are
``--config.a.b=value`` (the ``--config.`` prefix is optional); the value is coerced to the type
the field already has, list elements are addressed by index (``--config.data.sources.0.prefix=x``)
and unknown keys are an error that lists the keys that exist.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}


from gte_jax.errors import ConfigError  # noqa: E402  (re-exported: gte_jax.config.ConfigError)


def _import_file(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"_gte_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot import as a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def coerce(text: str, current: Any, key: str) -> Any:
    """Parses ``text`` as a value of the same type as ``current`` (the field's present value)."""
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"--config.{key}={text!r}: expected a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text!r}: expected a number") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (list, tuple)):
        value = _literal(text)
        if isinstance(value, str):  # bare comma-separated list: a,b,c
            value = [v.strip() for v in text.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        if current and not isinstance(current[0], (dict, ml_collections.ConfigDict)):
            value = [coerce(str(v), current[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return type(current)(value)
    if isinstance(current, (dict, ml_collections.ConfigDict)):
        raise ConfigError(
            f"--config.{key}: is a group of fields; set its fields one by one "
            f"(e.g. --config.{key}.<field>=...), one of {sorted(current.keys())}"
        )
    # None (a placeholder) or any other type: Python literal if it parses, else the string.
    return _literal(text)


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, (list, tuple)):
        try:
            return node[int(part)]
        except (ValueError, IndexError):
            raise ConfigError(
                f"unknown config key {path!r}: {part!r} is not an index of a list of {len(node)}"
            ) from None
    if isinstance(node, (ml_collections.ConfigDict, dict)):
        if part not in node:
            import difflib

            close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1)
            if close:
                hint = f"did you mean {path[: len(path) - len(part)] + close[0]!r}?"
            else:
                hint = f"known fields here: {sorted(node.keys())}"
            raise ConfigError(f"unknown config key {path!r}: no field {part!r}; {hint}")
        return node[part]
    raise ConfigError(f"unknown config key {path!r}: {part!r} is below a plain value")


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets ``config.<key>`` (dotted) from the string ``text``, coerced to the field's type."""
    parts = key.split(".")
    node: Any = config
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]))
    last = parts[-1]
    current = _child(node, last, key)
    value = coerce(text, current, key)
    if isinstance(node, list):
        node[int(last)] = value
        return
    if isinstance(node, tuple):
        raise ConfigError(f"--config.{key}: cannot set an element of a tuple; use a list")
    try:
        node[last] = value
    except TypeError as e:  # ConfigDict's own type check (e.g. None-typed placeholders)
        raise ConfigError(f"--config.{key}={text!r}: {e}") from e


def parse_override(arg: str) -> tuple[str, str]:
    body = arg[2:] if arg.startswith("--") else arg
    if body.startswith("config."):
        body = body[len("config.") :]
    if "=" not in body:
        raise ConfigError(f"override {arg!r}: expected --config.a.b=value")
    key, value = body.split("=", 1)
    return key, value


def load_config(
    path: str | pathlib.Path, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """Loads ``path`` (``file.py`` or ``file.py:arg``) and applies ``--config.a.b=v`` overrides."""
    text = str(path)
    arg = None
    if ":" in text and not pathlib.Path(text).exists():
        text, arg = text.rsplit(":", 1)
    file = pathlib.Path(text)
    if not file.is_file():
        raise ConfigError(f"config file {file} not found: pass --config path/to/config.py")
    module = _import_file(file)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file}: defines no get_config(); a config file must define it")
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except TypeError as e:  # ml_collections refuses a value of another type than the default's
        raise ConfigError(f"{file}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{file}: get_config() must return an ml_collections.ConfigDict")
    check_schema(config, file)
    for item in overrides:
        apply_override(config, *parse_override(item))
    check_schema(config, file)
    return config


def _schema_for(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """The defaults tree a config is checked against: a training stage (``train`` group) against
    ``defaults.stage_config()``, a data-only config against ``default_data_config()``."""
    from gte_jax.data.pipeline import default_data_config
    from gte_jax.defaults import stage_config

    if "train" in config:
        return stage_config()
    if set(config.keys()) == {"data"}:
        schema = ml_collections.ConfigDict()
        schema.data = default_data_config()
        return schema
    return None


def check_schema(config: ml_collections.ConfigDict, origin: Any = "config") -> None:
    """Every key of a training config must be declared in the defaults (gte_jax/defaults.py,
    gte_jax/data/pipeline.py) and hold a value of the declared type: a misspelt key in a recipe
    file is an error at load time, not a silently ignored setting."""
    if "stages" in config:
        for name in config.stages:
            if name not in config:
                raise ConfigError(f"{origin}: stage {name!r} is listed in stages but not defined")
            _check_tree(config[name], _schema_for(config[name]), f"{name}.", origin)
        return
    schema = _schema_for(config)
    if schema is not None:
        _check_tree(config, schema, "", origin)


# Keys a training stage does not have, and where their setting lives.
_MOVED = {"data.batch_size": " (a stage's batch size is train.batch_size, the global batch)"}


def _check_tree(node: Any, schema: Any, prefix: str, origin: Any) -> None:
    import difflib

    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            hint = _MOVED.get(path, hint)
            raise ConfigError(
                f"{origin}: unknown config key {path!r}{hint}; every key is declared with its "
                "default in gte_jax/defaults.py (data: gte_jax/data/pipeline.py)"
            )
        value, default = node[key], schema[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ConfigError(f"{origin}: {path} must be a group of fields, got {value!r}")
            _check_tree(value, default, f"{path}.", origin)
        elif not _same_kind(value, default):
            raise ConfigError(
                f"{origin}: {path}={value!r} has type {type(value).__name__}; expected "
                f"{type(default).__name__} like its default {default!r}"
            )


def _same_kind(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))
