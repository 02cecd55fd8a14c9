"""E5-mistral's prompt templates and placeholder sampling, for every category in one place.

The prompts are files under ``gte_jax/resources/synth/``: ``categories.json`` names each
category's brainstorm and generate prompt, its placeholder choices, the reply keys that become
query / positive / negative and the language each must be in. This module loads and checks them,
draws one example's placeholders from that example's seed, and fills the template. The seed is a
pure function of (run seed, category, task index, example index), and is recorded with the
example, so a dataset can be regenerated example by example.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import random
import re
from collections.abc import Iterable, Mapping, Sequence

from gte_jax.errors import ConfigError

RESOURCES = pathlib.Path(__file__).resolve().parent.parent / "resources" / "synth"
PLACEHOLDER = re.compile(r"\{(\w+)\}")
ROLES = ("query", "positive", "negative")
TASK = "task"  # the placeholder that carries the brainstormed (or fixed) task


@dataclasses.dataclass(frozen=True)
class Category:
    """One data category: its prompts and how a reply maps to a training example."""

    name: str
    generate: str  # the generate prompt, with {placeholders}
    brainstorm: str | None  # the brainstorm prompt; None for a category with fixed tasks
    tasks: tuple[str, ...]  # fixed tasks (STS, bitext); empty for brainstormed categories
    placeholders: Mapping[str, tuple[str, ...]]  # name -> choices, each drawn uniformly
    fields: Mapping[str, str]  # role (query / positive / negative) -> reply key
    languages: Mapping[str, str]  # role -> the language placeholder it must be written in

    @property
    def language_placeholders(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.languages.values())))


def _check(name: str, spec: Mapping, generate: str) -> None:
    fields, languages = spec.get("fields", {}), spec.get("languages", {})
    if "query" not in fields or "positive" not in fields or set(fields) - set(ROLES):
        raise ConfigError(f"category {name!r}: 'fields' needs query and positive, roles {ROLES}")
    if set(languages) - set(fields):
        raise ConfigError(f"category {name!r}: 'languages' names roles without a field")
    known = set(spec.get("placeholders", {})) | set(languages.values()) | {TASK}
    used = set(PLACEHOLDER.findall(generate))
    if used - known or set(spec.get("placeholders", {})) - used:
        raise ConfigError(
            f"category {name!r}: the generate prompt uses {sorted(used)}, the spec defines "
            f"{sorted(known)}; make them agree"
        )
    if bool(spec.get("tasks")) == bool(spec.get("brainstorm")):
        raise ConfigError(f"category {name!r}: give either 'tasks' or a 'brainstorm' prompt")


def load_categories(
    names: Iterable[str] | None = None, root: pathlib.Path = RESOURCES
) -> dict[str, Category]:
    """The categories ``names`` (all when None) from ``root/categories.json``, checked."""
    specs = {
        k: v for k, v in json.loads((root / "categories.json").read_text()).items() if k[0] != "_"
    }
    names = list(specs) if names is None else list(names)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ConfigError(f"unknown categories {unknown}; known: {sorted(specs)}")
    out = {}
    for name in names:
        spec = specs[name]
        generate = (root / spec["generate"]).read_text()
        _check(name, spec, generate)
        out[name] = Category(
            name=name,
            generate=generate,
            brainstorm=(root / spec["brainstorm"]).read_text() if spec.get("brainstorm") else None,
            tasks=tuple(spec.get("tasks", ())),
            placeholders={k: tuple(v) for k, v in spec.get("placeholders", {}).items()},
            fields=dict(spec["fields"]),
            languages=dict(spec.get("languages", {})),
        )
    return out


def templates_digest(categories: Mapping[str, Category]) -> str:
    """A short hash of everything that shapes the prompts, to tell when they changed."""
    blob = json.dumps(
        {name: dataclasses.asdict(c) for name, c in sorted(categories.items())}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def example_seed(run_seed: int, *parts: object) -> int:
    """A 31-bit seed that is a pure function of the run seed and ``parts`` (no Python hash())."""
    text = ":".join(str(p) for p in (run_seed, *parts))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def sample_placeholders(
    category: Category, seed: int, languages: Sequence[tuple[str, float]]
) -> dict[str, str]:
    """One example's placeholder values, drawn from ``seed`` alone. Language placeholders come from
    ``languages`` ((name, weight) pairs), distinct when a category names two (bitext)."""
    rng = random.Random(seed)
    pool = list(languages)
    values = {}
    for name in category.language_placeholders:
        if not pool:
            raise ConfigError(
                f"category {category.name!r} needs {len(category.language_placeholders)} "
                f"different languages; --languages has {len(languages)}"
            )
        (pick,) = rng.choices(range(len(pool)), weights=[w for _, w in pool])
        values[name] = pool.pop(pick)[0]
    for name in sorted(category.placeholders):
        values[name] = rng.choice(category.placeholders[name])
    return values


def render(template: str, values: Mapping[str, str]) -> str:
    """``template`` with every ``{name}`` replaced (all names were checked at load)."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
