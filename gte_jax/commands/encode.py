"""`gte-jax encode`: embed a .txt (one text per line) or .jsonl (field "text") file into a float32
.npy array, with the model's own rule for prompts and pooling (``gte_jax.encode.Embedder``).

``--instruction TASK`` prepends ``TASK`` through ``--template`` (``gte_jax.prompts``: "plain" =
the text as given, e.g. INSTRUCTOR's "Represent the Medicine sentence for retrieval: "; "e5",
"qwen3", "instructor" or a text with one "{task}"; default: the template the model was trained
with, from its export, and a different one is refused: ``gte_jax.prompts.resolve_template``);
like any prompt, its tokens are left out of
pooling when the model's ``include_prompt`` is false -- what ``SentenceTransformer(export)
.encode(x, prompt=<the same prompt>)`` does."""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from etils import epath

from gte_jax.commands.common import USER_ERRORS, add_encoding_arguments, apply_dim, error
from gte_jax.encode import Embedder
from gte_jax.models.pooling import POOLING_MODES
from gte_jax.prompts import instruction_prompt, resolve_prompt
from gte_jax.textio import InputError, iter_jsonl, iter_lines, jsonl_field


def read_texts(path: str | pathlib.Path) -> list[str]:
    """Texts from a .txt (one per line, empty lines kept) or .jsonl (field "text") file."""
    path = epath.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise InputError(f"{path}: unsupported input type {suffix!r}; use .txt or .jsonl.")
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    if suffix == ".jsonl":
        return [jsonl_field(record, "text", where) for where, record in iter_jsonl(path)]
    texts = []
    for where, line in iter_lines(path, skip_blank=False):
        if isinstance(line, InputError):
            raise InputError(f"{where}: {line}.")
        texts.append(line)
    return texts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gte-jax encode",
        description="Embed texts from a .txt (one per line) or .jsonl (field 'text') file.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="HF / sentence-transformers directory, gte-jax workdir, or all-MiniLM-L6-v2",
    )
    parser.add_argument("--input", required=True, help=".txt or .jsonl file")
    parser.add_argument("--output", required=True, help="where to write the float32 [N, dim] .npy")
    add_encoding_arguments(parser, batch_size=32)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prefix", default="", help='prepended to every text, e.g. "query: "')
    prompt.add_argument(
        "--prompt-name",
        default=None,
        help="one of the model's prompts (config_sentence_transformers.json), e.g. query",
    )
    prompt.add_argument(
        "--instruction",
        default=None,
        help="a task instruction, prepended through --template (its tokens are not pooled when "
        "the model's include_prompt is false)",
    )
    parser.add_argument(
        "--template",
        default=None,
        help="how --instruction becomes the prompt: plain (as given), e5, qwen3, instructor, or a "
        'text with one "{task}"; default: the one the model was trained with (its export says); '
        "another one is an error",
    )
    parser.add_argument(
        "--pooling", choices=POOLING_MODES, default=None, help="default: the model's"
    )
    parser.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    parser.add_argument(
        "--no-packing",
        action="store_true",
        help="pad batches to bucket lengths instead of packing several texts per row (same "
        "embeddings; packing compiles one program per call)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    output = pathlib.Path(args.output)
    try:
        texts = read_texts(args.input)
        if not output.parent.is_dir():
            raise InputError(f"{output.parent} does not exist.")
        embedder = Embedder.from_pretrained(args.model)
        apply_dim(args, embedder)
        prefix = resolve_prompt(embedder.prompts, args.prompt_name, args.prefix or None)
        if args.instruction is not None:
            template = embedder.instruction_template(args.template)
            prefix = instruction_prompt(template, args.instruction)
        elif args.template is not None:
            raise InputError("--template formats --instruction: pass --instruction too.")
        embedder.prompt_length(prefix)  # a prompt that does not split exactly: exit 2 now
    except USER_ERRORS as e:
        return error("gte-jax encode", e)
    embeddings = embedder.encode(
        texts,
        batch_size=args.batch_size,
        max_length=args.max_length,
        prefix=prefix,
        pooling=args.pooling,
        normalize=False if args.no_normalize else None,
        show_progress=True,
        packing=not args.no_packing,
    )
    with output.open("wb") as f:
        np.save(f, embeddings)
    shapes = ", ".join("x".join(map(str, s)) for s in sorted(embedder.compiled_shapes))
    print(
        f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} float32 to {output} "
        f"({len(embedder.compiled_shapes)} batch shape(s) compiled: {shapes or 'none'}; "
        f"{'padded rows x length' if args.no_packing else 'packed rows x length x texts'})",
        file=sys.stderr,
    )
    return 0
