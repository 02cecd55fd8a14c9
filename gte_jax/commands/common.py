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
    """The options every command that embeds texts shares: ``--batch-size``, ``--max-length``,
    ``--dim`` (:func:`apply_dim`) and,
    with ``prefixes``, ``--query-prefix`` / ``--doc-prefix`` (``--prefix-query`` / ``--prefix-doc``
    also accepted; destinations ``query_prefix`` / ``doc_prefix``) or ``--query-instruction`` /
    ``--doc-instruction`` through ``--template`` (:func:`side_prefixes`)."""
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument(
        "--max-length", type=positive_int, default=None, help="default: the model's"
    )
    parser.add_argument(
        "--dim",
        type=positive_int,
        default=None,
        help="keep the first DIM coordinates of each embedding, re-normalised (a Matryoshka "
        "model's prefix); default: the model's truncate_dim, else its full dim",
    )
    if prefixes:
        parser.add_argument("--query-prefix", "--prefix-query", dest="query_prefix", default="")
        parser.add_argument("--doc-prefix", "--prefix-doc", dest="doc_prefix", default="")
        parser.add_argument(
            "--query-instruction", default="", help="a task for queries, through --template"
        )
        parser.add_argument(
            "--doc-instruction", default="", help="a task for documents, through --template"
        )
        parser.add_argument(
            "--template",
            default=None,
            help="how an instruction becomes the prompt (plain, e5, qwen3, instructor, or a text "
            'with one "{task}"); default: the one the model was trained with (its export says); '
            "another one is an error",
        )


def apply_dim(args: Any, embedder: Any) -> None:
    """``--dim`` given: the embedder truncates every embedding to it (``Embedder
    .set_truncate_dim``; ValueError, exit 2, for a dim the model does not have)."""
    if args.dim is not None:
        embedder.set_truncate_dim(args.dim)


def side_prefixes(args: Any, embedder: Any) -> tuple[str, str]:
    """(query prefix, document prefix) of ``add_encoding_arguments(prefixes=True)``'s options: a
    side's instruction goes through the model's template (``Embedder.instruction_template``, the
    rule ``encode`` and training use), else its prefix. Raises ValueError on a conflict."""
    from gte_jax.prompts import side_prompt

    out = []
    for side in ("query", "doc"):
        prefix, task = getattr(args, f"{side}_prefix"), getattr(args, f"{side}_instruction")
        if prefix and task:
            raise ValueError(f"pass --{side}-prefix or --{side}-instruction, not both")
        out.append(side_prompt(prefix, embedder.instruction_template(args.template), task))
    if args.template is not None and not (args.query_instruction or args.doc_instruction):
        raise ValueError("--template formats --query-instruction / --doc-instruction: pass one")
    return out[0], out[1]
