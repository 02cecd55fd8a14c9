"""Writes that a full disk or a kill cannot leave half done, and a start-up check that the workdir
can be written at all (local or ``gs://``).

A directory the run writes (``base_model/``, ``export/``, ``best/``) is *complete* when it holds
:data:`COMPLETE_MARKER`, written after every other file. A rerun rewrites a directory without it.
Locally the files are also written under a temporary name (``.<name>.partial``) and renamed into
place, so the final name never holds a half-written model (a reader such as transformers, which
knows nothing of the marker, cannot load a truncated one). GCS has no atomic directory rename (a
"rename" is a copy of every object, then a delete): there the files go straight to their final
names and the marker alone says the directory is whole; it works the same on both, which is why
it, not the rename, is the rule readers check. Single files (``summary.json``, ``card.json``,
...) are renamed into place locally; a GCS object appears only once its upload has finished.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
from collections.abc import Iterator

from etils import epath

from gte_jax.errors import ConfigError

COMPLETE_MARKER = ".gte_jax_complete"
# How long the start-up probe of a gs:// workdir may take (gcsfs retries a refused connection
# with backoff for ~50 s; a reachable bucket answers in well under a second).
GCS_PROBE_SECONDS = 5.0
GCS_EXTRA = "pip install 'gte-jax[gcs]'"


def is_local(path: epath.PathLike) -> bool:
    return "://" not in os.fspath(path)


def is_complete(directory: epath.PathLike) -> bool:
    """Whether ``directory`` was written to the end by :func:`complete_dir`."""
    return (epath.Path(directory) / COMPLETE_MARKER).exists()


def _rmtree(path: epath.Path) -> None:
    shutil.rmtree(os.fspath(path), ignore_errors=True)


def _replaceable(out: epath.Path) -> bool:
    """Only a directory we wrote, a model directory or an empty one is replaced wholesale."""
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    names = {p.name for p in out.iterdir()}
    model_files = {COMPLETE_MARKER, "config.json", "modules.json"}
    return not names or bool(names & model_files) or any(n.endswith(".safetensors") for n in names)


@contextlib.contextmanager
def complete_dir(out: epath.PathLike) -> Iterator[epath.Path]:
    """Yields the directory to write ``out``'s files into; when the block ends without an error
    the marker is written last (and, locally, the directory renamed to ``out``)."""
    out = epath.Path(out)
    if not is_local(out):  # files are overwritten in place, nothing else is removed
        if is_complete(out):
            (out / COMPLETE_MARKER).unlink()
        out.mkdir(parents=True, exist_ok=True)
        yield out
        (out / COMPLETE_MARKER).write_text("")
        return
    if not _replaceable(out):  # the rename below replaces the whole directory
        raise ConfigError(
            f"{out} exists and is not a model directory: refusing to replace it; choose another "
            "output directory"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial"
    _rmtree(tmp)  # what a killed earlier attempt left
    tmp.mkdir()
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text("")
    except BaseException:
        _rmtree(tmp)  # a full disk gets its space back
        raise
    _rmtree(out)
    os.replace(os.fspath(tmp), os.fspath(out))


def write_text(path: epath.PathLike, text: str) -> None:
    """``path`` holds the whole of ``text`` or what it held before, never a part."""
    path = epath.Path(path)
    if not is_local(path):
        path.write_text(text)
        return
    tmp = path.parent / f".{path.name}.partial"
    try:
        tmp.write_text(text)
        os.replace(os.fspath(tmp), os.fspath(path))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def os_error_line(e: OSError) -> str:
    """``<path>: <what> (<ERRNO>)``: the one line a user needs to act on a failed read or write."""
    if e.errno is None:
        return str(e)
    name = errno.errorcode.get(e.errno, str(e.errno))
    where = e.filename if e.filename is not None else "a file"
    text = f"{where}: {e.strerror or os.strerror(e.errno)} ({name})"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; free some space (or use another --workdir) and rerun: the run resumes"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        text += "; choose a --workdir this process can write"
    return text


def check_writable(workdir: epath.PathLike) -> None:
    """Creates ``workdir`` and writes (then removes) a probe file in it, so a read-only, missing
    or unreachable workdir fails at start-up with one line, not after the model is loaded."""
    workdir = epath.Path(workdir)
    if not is_local(workdir):
        _check_remote(workdir)
        return
    probe = workdir / f".write_probe.{os.getpid()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        if e.filename is None:
            e.filename = os.fspath(probe)
        raise


def _check_remote(workdir: epath.Path) -> None:
    text = os.fspath(workdir)
    # gcsfs logs at import (its experimental features), each retry (a traceback once out of
    # retries) and its bucket-type probe: ~170 lines for one unreachable bucket. Quiet while
    # probing; left quiet when the probe fails, since its retries go on in the background until
    # the process exits.
    quiet = [logging.getLogger(name) for name in ("gcsfs", "fsspec", "google")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    if text.startswith(("gs://", "gcs://")):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            raise ConfigError(f"--workdir {text} needs gcsfs: {GCS_EXTRA}") from None
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            target = workdir / f".write_probe.{os.getpid()}"
            target.write_text("")
            target.unlink()
            result.append(None)
        except BaseException as e:  # reported by the caller's thread
            result.append(e)

    thread = threading.Thread(target=probe, daemon=True, name="gte-jax workdir probe")
    thread.start()
    thread.join(GCS_PROBE_SECONDS)
    if result and result[0] is None:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    if not result:
        raise ConfigError(
            f"--workdir {text}: no answer from the storage within {GCS_PROBE_SECONDS:.0f} s "
            "(no network, no credentials, or STORAGE_EMULATOR_HOST pointing nowhere?); "
            "check `gcloud auth application-default login` and the bucket name"
        )
    if result[0] is not None:
        e = result[0]
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--workdir {text} cannot be written: {type(e).__name__}: {first}")
