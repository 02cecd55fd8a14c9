"""Prompts (prefixes and instructions) and which of their tokens are pooled: one rule for training,
``encode``, ``eval``, ``mine``, the MTEB adapter and the export.

A prompt is text prepended to a query or document ("query: ", "Instruct: ...\\nQuery: ", a
per-record instruction). When a model's ``include_prompt`` is False, the first
:func:`prompt_length` tokens of the prompted text are not pooled. That is sentence-transformers'
rule (``Transformer._get_prompt_length`` + ``Pooling(include_prompt=False)``): the prompt tokenised
alone, its leading special token ([CLS], <s>) included and a trailing special token ([SEP], </s>)
not. Using exactly that rule is what makes ``SentenceTransformer(export).encode(x,
prompt_name=...)`` reproduce what was trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def prompt_length(tokenizer: Any, prompt: str) -> int:
    """Tokens of ``prompt`` that are excluded from pooling when ``include_prompt`` is False."""
    if not prompt:
        return 0
    ids = tokenizer(prompt)["input_ids"]
    n = len(ids)
    if n and ids[-1] in set(getattr(tokenizer, "all_special_ids", ()) or ()):
        n -= 1
    return n


class PromptLengths:
    """:func:`prompt_length` memoised per prompt (a batch repeats a handful of prompts)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}

    def __call__(self, prompt: str) -> int:
        if prompt not in self._cache:
            self._cache[prompt] = prompt_length(self.tokenizer, prompt)
        return self._cache[prompt]


def pool_mask(num_tokens: int, num_prompt_tokens: int) -> list[int]:
    """[num_tokens] 1 = pooled: the first ``num_prompt_tokens`` tokens are not."""
    cut = min(num_prompt_tokens, num_tokens)
    return [0] * cut + [1] * (num_tokens - cut)


def pool_masks(
    lengths: PromptLengths, prompts: Sequence[str], ids: Sequence[Sequence[int]]
) -> list[list[int]]:
    """The pool mask of each tokenised text ``ids[i]`` whose prompt was ``prompts[i]``."""
    return [pool_mask(len(row), lengths(p)) for p, row in zip(prompts, ids, strict=True)]


def training_prompts(sources: Sequence[Any]) -> dict[str, str]:
    """The prompts a training run used, as sentence-transformers ``prompts`` (name -> text).

    When every source uses the same query and document prefixes they are ``"query"`` and
    ``"document"`` (sentence-transformers' and MTEB's names); otherwise each source's are
    ``"<source>_query"`` / ``"<source>_document"``. Empty prefixes are left out. Per-record
    instructions are data, not prompts of the model: pass them with ``prompt=`` at encode time."""
    pairs = {(s.options.query_prefix, s.options.doc_prefix) for s in sources}
    out: dict[str, str] = {}
    if len(pairs) == 1:
        query, doc = next(iter(pairs))
        if query:
            out["query"] = query
        if doc:
            out["document"] = doc
        return out
    for s in sources:
        if s.options.query_prefix:
            out[f"{s.name}_query"] = s.options.query_prefix
        if s.options.doc_prefix:
            out[f"{s.name}_document"] = s.options.doc_prefix
    return out


def resolve_prompt(prompts: Mapping[str, str], prompt_name: str | None, prompt: str | None) -> str:
    """sentence-transformers' ``encode(prompt=..., prompt_name=...)``: an explicit prompt wins."""
    if prompt is not None:
        return prompt
    if prompt_name is None:
        return ""
    if prompt_name not in prompts:
        raise ValueError(
            f"prompt name {prompt_name!r} is not one of the model's prompts {sorted(prompts)}"
        )
    return prompts[prompt_name]
