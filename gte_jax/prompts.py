"""Prompts (prefixes and instructions) and which of their tokens are pooled: one rule for training,
``encode``, ``eval``, ``mine``, the MTEB adapter and the export.

A prompt is text prepended to a query or document ("query: ", "Instruct: ...\\nQuery: ", a
per-record instruction). When a model's ``include_prompt`` is False, the first
:func:`prompt_length` tokens of the prompted text are not pooled. That is sentence-transformers'
rule (``Transformer._get_prompt_length`` + ``Pooling(include_prompt=False)``): the prompt tokenised
alone, its leading special token ([CLS], <s>) included and a trailing special token ([SEP], </s>)
not. Using exactly that rule is what makes ``SentenceTransformer(export).encode(x,
prompt_name=...)`` reproduce what was trained. Under left padding the excluded tokens are the
first ``prompt_length`` *real* tokens (sentence-transformers' ``_exclude_prompt_from_mask``).

**Instructions.** A task text ("Given a web search query, retrieve relevant passages") becomes a
prompt through a *template* with one ``{task}`` field (:func:`instruction_prompt`); the presets
of :data:`INSTRUCTION_TEMPLATES` are E5-mistral's ``"Instruct: {task}\\nQuery: "`` (queries only,
documents bare), Qwen3-Embedding's (the same without the space after "Query:"), INSTRUCTOR's
``"Represent the {task}: "`` (both sides, task = "{domain} {text_type} for {objective}", e.g.
"Medicine sentence for retrieving a duplicate sentence") and ``"plain"`` (the task text is the
whole prompt: per-record instructions that are written out, such as MEDI's). The template
belongs to the data (a source's ``instruction_template``); per source, ``query_instruction`` /
``doc_instruction`` are its tasks; a record's own ``instruction`` (``doc_instruction``) replaces
the source's for that record and goes through the same template; a side with no task keeps its
plain ``query_prefix`` / ``doc_prefix`` (:func:`side_prompt`). The export carries each source's
resolved prompts as sentence-transformers ``prompts`` (:func:`training_prompts`); per-record
instructions are data and are given at encode time (``prompt=`` in sentence-transformers,
``gte-jax encode --instruction``, the MTEB adapter's task instructions).

**Exactness.** The rule above excludes exactly the prompt's own tokens only when the tokenizer
does not merge the prompt's last characters with the text's first ones (a byte-level BPE
"Query: " + "Hello" gives "ĠHello", which the prompt tokenised alone counts as its own "Ġ").
:func:`check_prompt` compares the rule with the tokenizer's offsets (``offset_mapping``) and
refuses such a prompt with a message that says what to change; every prompt training or encode
excludes from pooling is checked once (:class:`PromptLengths`): a source's own and those of the
records of in-memory sources at start-up, the records' of a TFDS source at first use.

**Padding side and EOS** live on the tokenizer (:func:`configure_tokenizer`, from
``model.padding_side`` / ``model.append_eos``), so training batches, ``encode`` and the
exported tokenizer that sentence-transformers applies pad and end texts the same way. Under left
padding the excluded tokens are still the first ``prompt_length`` real ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# A template turns a task text into a prompt: exactly one "{task}" field.
INSTRUCTION_TEMPLATES = {
    "plain": "{task}",
    "e5": "Instruct: {task}\nQuery: ",  # E5-mistral (Wang et al., 2024): queries only
    "qwen3": "Instruct: {task}\nQuery:",  # Qwen3-Embedding: queries only, no space
    "instructor": "Represent the {task}: ",  # INSTRUCTOR (Su et al., 2023): both sides
}
# Texts :func:`check_prompt` appends to a prompt: texts start with a word or a number.
PROBE_TEXTS = ("Hello world", "the end", "1984 was")


def instruction_template(template: str) -> str:
    """A preset name of :data:`INSTRUCTION_TEMPLATES` or a template string -> the template."""
    resolved = INSTRUCTION_TEMPLATES.get(template, template)
    if resolved.count("{task}") != 1:
        raise ValueError(
            f"instruction template {template!r} must be one of {sorted(INSTRUCTION_TEMPLATES)} "
            'or a text with exactly one "{task}" field, e.g. "Instruct: {task}\\nQuery: "'
        )
    return resolved


def instruction_prompt(template: str, task: str) -> str:
    """The prompt of ``task`` under ``template``; no task, no prompt."""
    if not task:
        return ""
    return instruction_template(template).replace("{task}", task)


def side_prompt(prefix: str, template: str, task: str) -> str:
    """One side's (query or document) prompt: its task through the template, else its prefix."""
    return instruction_prompt(template, task) if task else prefix


def prompt_length(tokenizer: Any, prompt: str) -> int:
    """Tokens of ``prompt`` that are excluded from pooling when ``include_prompt`` is False."""
    if not prompt:
        return 0
    ids = tokenizer(prompt)["input_ids"]
    n = len(ids)
    if n and ids[-1] in set(getattr(tokenizer, "all_special_ids", ()) or ()):
        n -= 1
    return n


def offsets_prompt_split(tokenizer: Any, prompt: str, text: str) -> tuple[int, bool]:
    """(:func:`prompt_length`, whether it splits ``prompt + text`` exactly at the prompt).

    Exact means, by the tokenizer's own character offsets: no excluded token holds a character
    of the text, and no pooled token holds a non-space character of the prompt."""
    n = prompt_length(tokenizer, prompt)
    enc = tokenizer(prompt + text, return_offsets_mapping=True)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    tokens = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
    head = len(prompt.rstrip())
    excluded_ok = all(end <= len(prompt) for i, (_, end) in tokens[:n] if i not in special)
    pooled_ok = all(start >= head for i, (start, _) in tokens[n:] if i not in special)
    return n, excluded_ok and pooled_ok


def check_prompt(tokenizer: Any, prompt: str) -> int:
    """:func:`prompt_length`, after checking on :data:`PROBE_TEXTS` that it excludes exactly the
    prompt's tokens (:func:`offsets_prompt_split`); raises ValueError saying what to change."""
    n = prompt_length(tokenizer, prompt)
    for text in PROBE_TEXTS if prompt else ():
        _, exact = offsets_prompt_split(tokenizer, prompt, text)
        if not exact:
            ids = tokenizer(prompt + text)["input_ids"]
            raise ValueError(
                f"prompt {prompt!r}: this tokenizer merges its end with the text's start "
                f"({tokenizer.convert_ids_to_tokens(ids)[max(n - 2, 0) : n + 1]} for "
                f"{text!r}), so the prompt tokenised alone ({n} tokens, sentence-transformers' "
                "rule) would leave text tokens out of pooling: end the prompt without trailing "
                "whitespace (or use a tokenizer that strips it, as T5's does), or set "
                "model.include_prompt=true"
            )
    return n


class PromptLengths:
    """:func:`check_prompt` memoised per prompt (a batch repeats a handful of prompts)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}

    def __call__(self, prompt: str) -> int:
        if prompt not in self._cache:
            self._cache[prompt] = check_prompt(self.tokenizer, prompt)
        return self._cache[prompt]


def pool_mask(num_tokens: int, num_prompt_tokens: int) -> list[int]:
    """[num_tokens] 1 = pooled: the first ``num_prompt_tokens`` tokens are not (padding is
    added after, on the side the tokenizer pads: the mask moves with its tokens)."""
    cut = min(num_prompt_tokens, num_tokens)
    return [0] * cut + [1] * (num_tokens - cut)


def pool_masks(
    lengths: PromptLengths, prompts: Sequence[str], ids: Sequence[Sequence[int]]
) -> list[list[int]]:
    """The pool mask of each tokenised text ``ids[i]`` whose prompt was ``prompts[i]``."""
    return [pool_mask(len(row), lengths(p)) for p, row in zip(prompts, ids, strict=True)]


def training_prompts(sources: Sequence[Any]) -> dict[str, str]:
    """The prompts a training run used, as sentence-transformers ``prompts`` (name -> text).

    When every source uses the same query and document prompts (prefixes, or instructions
    through their template) they are ``"query"`` and
    ``"document"`` (sentence-transformers' and MTEB's names); otherwise each source's are
    ``"<source>_query"`` / ``"<source>_document"``. Empty prompts are left out. Per-record
    instructions are data, not prompts of the model: pass them with ``prompt=`` at encode time."""
    pairs = {(s.options.query_prompt(), s.options.doc_prompt()) for s in sources}
    out: dict[str, str] = {}
    if len(pairs) == 1:
        query, doc = next(iter(pairs))
        if query:
            out["query"] = query
        if doc:
            out["document"] = doc
        return out
    for s in sources:
        query, doc = s.options.query_prompt(), s.options.doc_prompt()
        if query:
            out[f"{s.name}_query"] = query
        if doc:
            out[f"{s.name}_document"] = doc
    return out


def training_templates(sources: Sequence[Any]) -> list[str]:
    """The instruction templates (resolved, sorted) a training run formatted instructions with:
    those of the pair sources with a task of their own, a template other than "plain", or records
    known to carry instructions (a TFDS source's are read lazily: unknown records with the plain
    template record nothing, which :func:`resolve_template` also reads as plain). The export records
    them so that :func:`resolve_template` gives encode, eval, mine and the MTEB adapter the
    training's formatting of an instruction."""
    used = set()
    for s in sources:
        if getattr(s, "kind", "pairs") != "pairs":
            continue
        o = s.options
        records = getattr(s, "record_instructions", None) or ()
        if (
            o.query_instruction
            or o.doc_instruction
            or instruction_template(o.instruction_template) != INSTRUCTION_TEMPLATES["plain"]
            or any(q or d for q, d in records)
        ):
            used.add(instruction_template(o.instruction_template))
    return sorted(used)


def template_name(template: str) -> str:
    """The preset name of a resolved template, else the template text (for messages)."""
    names = [k for k, v in INSTRUCTION_TEMPLATES.items() if v == template]
    return names[0] if names else repr(template)


def resolve_template(recorded: Sequence[str], given: str | None) -> str:
    """The template an instruction is formatted with at inference, one rule for ``encode``,
    ``eval``, ``mine`` and the MTEB adapter. ``recorded``: the templates the model was trained
    with (its export's, :func:`training_templates`; empty when unknown); ``given``: the user's
    (``--template``), or None.

    None takes the model's one template ("plain" when it records none); a given template must be
    one the model was trained with. Raises ValueError (exit 2 in the CLI) instead of formatting
    the instruction unlike training."""
    recorded = sorted(set(recorded))
    names = ", ".join(template_name(t) for t in recorded)
    if given is None:
        if len(recorded) > 1:
            raise ValueError(
                f"the model was trained with several instruction templates ({names}): pass "
                "--template (instruction_template) to say which one this instruction uses"
            )
        return recorded[0] if recorded else INSTRUCTION_TEMPLATES["plain"]
    template = instruction_template(given)
    if recorded and template not in recorded:
        raise ValueError(
            f"template {given!r} is not the one the model was trained with ({names}): drop "
            "--template (instruction_template) to use the model's, or pass that one"
        )
    return template


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


def configure_tokenizer(tokenizer: Any, *, padding_side: str = "auto", append_eos: bool = False):
    """Sets the tokenizer's padding side and makes it end every text with EOS, *on the tokenizer
    itself*: training batches, ``encode`` and the export (whose tokenizer sentence-transformers
    applies) then pad and terminate texts the same way.

    ``padding_side``: "left" | "right" | "auto" (the tokenizer's own), saved with the tokenizer.
    ``append_eos``: the post-processor gets the EOS token after the text (E5-mistral appends EOS
    to every input), keeping the special tokens it already adds; a no-op when it already ends
    texts with EOS (Qwen3-Embedding's tokenizer does). Returns the tokenizer."""
    if padding_side not in ("auto", "left", "right"):
        raise ValueError(f"padding_side={padding_side!r}: use auto, left or right")
    if padding_side != "auto":
        tokenizer.padding_side = padding_side
        tokenizer.init_kwargs["padding_side"] = padding_side  # written by save_pretrained
    if append_eos:
        _append_eos(tokenizer)
    return tokenizer


def _append_eos(tokenizer: Any) -> None:
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("append_eos: the tokenizer has no eos_token; set one or do not append")
    full = tokenizer("a")["input_ids"]
    if full[-1] == eos_id:
        return
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
    before, after = full[:start], full[start + len(bare) :]
    names = tokenizer.convert_ids_to_tokens(before + after)
    parts = [*names[: len(before)], "$A", *names[len(before) :], eos]
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(parts),
        pair=" ".join(parts) + f" $B:1 {eos}:1",
        special_tokens=sorted(set(zip([*names, eos], [*before, *after, eos_id], strict=True))),
    )
