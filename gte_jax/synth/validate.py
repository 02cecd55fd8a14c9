"""What an LLM reply must be to become a training example, and why it was rejected otherwise.

A generate reply is one JSON object (a Markdown code fence around it is tolerated); its keys are
mapped to query / positive / negative by the category (``templates.Category.fields``). Reject
reasons, checked in this order:

- ``not_json``: not a JSON object;
- ``missing_field``: a key of the category absent, null, or not text (numbers are taken as text);
- ``empty_field``: a text that is empty after stripping;
- ``too_long``: a text over ``max_chars`` characters;
- ``query_is_positive`` / ``negative_is_positive``: the two texts equal after normalisation;
- ``wrong_language``: a text not mostly in the script of its language, for languages with a
  script of their own or a Latin one (English, French, ... cannot be told apart this way: those
  are only checked to be Latin-script);
- ``duplicate`` (decided by the run, in job order): the normalised (query, positive) seen before.

Normalisation (:func:`normalise`) is Unicode NFKC, case folding, punctuation and symbols removed,
whitespace collapsed, so near-duplicates that differ in case, punctuation or spacing hash alike.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from gte_jax.synth.templates import Category
from gte_jax.textio import normalise  # the one duplicate-text rule (mine uses it too)

REASONS = (
    "not_json",
    "missing_field",
    "empty_field",
    "too_long",
    "query_is_positive",
    "negative_is_positive",
    "wrong_language",
    "duplicate",
)
BRAINSTORM_REASONS = ("not_list", "empty_list")
# A text is in its language's script when at least this share of its letters are.
MIN_SCRIPT_SHARE = 0.5
_FENCE = re.compile(r"^\s*```[\w-]*\s*\n(.*?)\n?\s*```\s*$", re.DOTALL)

_LATIN = ("LATIN",)
# Language -> Unicode script names (prefixes of unicodedata.name) its letters come from.
SCRIPTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        "English French German Spanish Italian Portuguese Dutch Polish Czech Slovak Swedish "
        "Danish Norwegian Finnish Estonian Latvian Lithuanian Hungarian Romanian Croatian "
        "Slovenian Turkish Vietnamese Indonesian Malay Tagalog Swahili Catalan Basque Galician "
        "Irish Welsh Icelandic Albanian Afrikaans Esperanto Latin Uzbek Azerbaijani Somali "
        "Hausa".split(),
        _LATIN,
    ),
    **dict.fromkeys(
        "Russian Ukrainian Bulgarian Belarusian Macedonian Kazakh Kyrgyz".split(), ("CYRILLIC",)
    ),
    **dict.fromkeys("Arabic Persian Urdu Pashto Sindhi Uyghur".split(), ("ARABIC",)),
    **dict.fromkeys("Hindi Marathi Nepali Sanskrit".split(), ("DEVANAGARI",)),
    "Chinese": ("CJK",),
    "Japanese": ("CJK", "HIRAGANA", "KATAKANA"),
    "Korean": ("HANGUL",),
    "Greek": ("GREEK",),
    "Hebrew": ("HEBREW",),
    "Yiddish": ("HEBREW",),
    "Thai": ("THAI",),
    "Lao": ("LAO",),
    "Khmer": ("KHMER",),
    "Burmese": ("MYANMAR",),
    "Georgian": ("GEORGIAN",),
    "Armenian": ("ARMENIAN",),
    "Amharic": ("ETHIOPIC",),
    "Bengali": ("BENGALI",),
    "Assamese": ("BENGALI",),
    "Tamil": ("TAMIL",),
    "Telugu": ("TELUGU",),
    "Kannada": ("KANNADA",),
    "Malayalam": ("MALAYALAM",),
    "Gujarati": ("GUJARATI",),
    "Punjabi": ("GURMUKHI",),
    "Oriya": ("ORIYA",),
    "Sinhala": ("SINHALA",),
    "Mongolian": ("CYRILLIC",),
}


class Rejected(ValueError):
    """A reply that cannot become an example; ``reason`` is one of :data:`REASONS` (or
    :data:`BRAINSTORM_REASONS`), ``detail`` says what exactly."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def dedup_key(query: str, positive: str) -> str:
    """The normalised text hash that decides duplicates (exact and near)."""
    return hashlib.sha256(f"{normalise(query)}\t{normalise(positive)}".encode()).hexdigest()[:24]


def script_share(text: str, scripts: tuple[str, ...]) -> float | None:
    """Share of the letters of ``text`` whose Unicode name starts with one of ``scripts``;
    None when ``text`` has no letters (nothing to check)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    inside = sum(unicodedata.name(c, "").startswith(scripts) for c in letters)
    return inside / len(letters)


def in_language(text: str, language: str) -> bool:
    """False only when ``language``'s script is known and most letters of ``text`` are not in it."""
    scripts = SCRIPTS.get(language.strip().title())
    share = None if scripts is None else script_share(text, scripts)
    return share is None or share >= MIN_SCRIPT_SHARE


def _strip_fence(content: str) -> str:
    match = _FENCE.match(content)
    return match.group(1) if match else content.strip()


def parse_object(content: str) -> dict[str, Any]:
    try:
        value = json.loads(_strip_fence(content))
    except ValueError as e:
        raise Rejected("not_json", str(e)) from None
    if not isinstance(value, dict):
        raise Rejected("not_json", f"a JSON {type(value).__name__}, not an object")
    return value


def _text(reply: Mapping[str, Any], key: str, max_chars: int) -> str:
    value = reply.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a numeric label ("label": 4) is text to embed
    if value is None or not isinstance(value, str):
        what = "absent" if value is None else f"a {type(value).__name__}"
        raise Rejected("missing_field", f'"{key}" is {what}; keys: {sorted(reply)}')
    value = value.strip()
    if not value:
        raise Rejected("empty_field", f'"{key}" is empty')
    if len(value) > max_chars:
        raise Rejected("too_long", f'"{key}" has {len(value)} characters (> {max_chars})')
    return value


def extract_example(
    category: Category, content: str, placeholders: Mapping[str, str], *, max_chars: int
) -> dict[str, str]:
    """Role -> text of one generate reply, or :class:`Rejected` with the first reason found."""
    reply = parse_object(content)
    texts = {role: _text(reply, key, max_chars) for role, key in category.fields.items()}
    if normalise(texts["query"]) == normalise(texts["positive"]):
        raise Rejected("query_is_positive", "the positive repeats the query")
    if "negative" in texts and normalise(texts["negative"]) == normalise(texts["positive"]):
        raise Rejected("negative_is_positive", "the negative repeats the positive")
    for role, text in texts.items():
        language = placeholders.get(category.languages.get(role, ""), "")
        if language and not in_language(text, language):
            raise Rejected("wrong_language", f"the {role} is not in {language}")
    return texts


def parse_task_list(content: str) -> list[str]:
    """A brainstorm reply: a JSON array or Python list literal of task strings."""
    text = _strip_fence(content)
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise Rejected("not_list", "neither a JSON array nor a Python list") from None
    if not isinstance(value, list):
        raise Rejected("not_list", f"a {type(value).__name__}, not a list")
    # One line per task: it goes into a one-line instruction ("Instruct: {task}\nQuery: ").
    tasks = [" ".join(t.split()) for t in value if isinstance(t, str) and t.strip()]
    if not tasks:
        raise Rejected("empty_list", "no task strings in the list")
    return tasks
