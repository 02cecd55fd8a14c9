"""The libtpu flags gte-jax runs every TPU program with: one list, set in ``LIBTPU_INIT_ARGS`` by
the CLI before libtpu starts, so ``train`` on a TPU VM and ``plan``'s compile for a topology (and
the tests' TPU compiles, ``tests/conftest.py``) build the same program.

A flag already named in ``LIBTPU_INIT_ARGS`` keeps the user's value; ``GTE_JAX_LIBTPU_DEFAULTS=0``
adds none. libtpu refuses to start on a flag it does not know, so a flag is added only when the
installed libtpu names it (its library is searched for the name; without libtpu nothing is
added: no TPU program can run or be planned).
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import pathlib
from collections.abc import MutableMapping

# name -> value; every value says why (ours: measured here with `plan`'s compile).
DEFAULT_FLAGS: dict[str, str] = {
    # ours. On a multi-host slice (v5e-64) XLA:TPU writes the all-gather of a small array (every
    # BERT-base layer kernel; not the 94 MB word table) as an all-reduce of a zero-padded copy:
    # twice the bytes of the gather on the ring. FSDP's per-step weight gathers of GTE-base
    # stage 1 were 1.55x the float32 parameter bytes of all-reduce per chip per step; with this
    # flag they are all-gathers (benchmarks/README.md, "Activation sharding and one reduction").
    # MaxText's and the TPU performance recipes' LIBTPU_INIT_ARGS set it too.
    "xla_tpu_prefer_async_allgather_to_allreduce": "true",
}
ENV = "LIBTPU_INIT_ARGS"
OPT_OUT = "GTE_JAX_LIBTPU_DEFAULTS"


def _named(args: str) -> set[str]:
    """The flag names in a ``LIBTPU_INIT_ARGS`` string ("--name=value" or "--name")."""
    names = set()
    for token in args.split():
        if token.startswith("--"):
            names.add(token[2:].split("=", 1)[0])
    return names


def libtpu_path() -> pathlib.Path | None:
    """The installed ``libtpu.so`` (None: libtpu is not installed)."""
    try:
        spec = importlib.util.find_spec("libtpu")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "libtpu.so"
        if path.exists():
            return path
    return None


def known_to(library: pathlib.Path, names: list[str]) -> set[str]:
    """Which of ``names`` the library's bytes contain (libtpu's flag table holds each name). An
    unreadable or empty file names none: libtpu itself will then say what is wrong with it."""
    try:
        with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return {name for name in names if data.find(name.encode()) >= 0}
    except (OSError, ValueError):  # ValueError: mmap of an empty file
        return set()


def apply(
    environ: MutableMapping[str, str] | None = None, library: pathlib.Path | None = None
) -> list[str]:
    """Appends each of :data:`DEFAULT_FLAGS` that ``LIBTPU_INIT_ARGS`` does not name and the
    installed libtpu (or ``library``) knows; returns the flags added ("--name=value")."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    current = environ.get(ENV, "")
    missing = [name for name in DEFAULT_FLAGS if name not in _named(current)]
    if not missing:
        return []
    library = library or libtpu_path()
    if library is None:
        return []
    known = known_to(library, missing)
    added = [f"--{name}={DEFAULT_FLAGS[name]}" for name in missing if name in known]
    if added:
        environ[ENV] = " ".join([*current.split(), *added])
    return added
