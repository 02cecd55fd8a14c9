"""What every subcommand shares: argument types, the embedding options, and one rule for exit
codes (0 done, 2 bad usage / config / input with a one-line message, 1 the run itself failed)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gte_jax.checkpoint import CheckpointError
from gte_jax.errors import ConfigError
from gte_jax.textio import InputError

# Errors that mean "the user's input or settings cannot work": a message and exit 2, no traceback.
USER_ERRORS = (InputError, ConfigError, CheckpointError, FileNotFoundError, ValueError)


def setup_logging(level: str | int = "INFO") -> None:
    """Our log lines on stderr at ``level``. ``force``: libraries imported before (absl through
    orbax) may have put their own handler on the root logger, which would swallow INFO lines."""
    import logging

    level = level.upper() if isinstance(level, str) else level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    # orbax logs every save/restore step at INFO through absl; keep the console for our own lines.
    logging.getLogger("absl").setLevel(max(logging.WARNING, logging.getLogger().level))


def error(prog: str, message: Any) -> int:
    """Prints ``<prog>: error: <message>`` on stderr; returns exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    """argparse type for counts and lengths: a bad value is a usage error (exit 2), not a crash."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_encoding_arguments(parser, *, batch_size: int, prefixes: bool = False) -> None:
    """The options every command that embeds texts shares: ``--batch-size``, ``--max-length`` and,
    with ``prefixes``, ``--query-prefix`` / ``--doc-prefix`` (``--prefix-query`` / ``--prefix-doc``
    also accepted; destinations ``query_prefix`` / ``doc_prefix``)."""
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument(
        "--max-length", type=positive_int, default=None, help="default: the model's"
    )
    if prefixes:
        parser.add_argument("--query-prefix", "--prefix-query", dest="query_prefix", default="")
        parser.add_argument("--doc-prefix", "--prefix-doc", dest="doc_prefix", default="")
