"""Hard-negative mining for stage-2 fine-tuning: the ``gte-jax mine`` command.

For each (query, positive) pair the corpus is searched exactly (``search.search``, cosine) and
each ranked candidate goes through these filters, in this order; the first that applies drops it
and is counted (``MinedNegatives.dropped``, summed in the command's summary):

1. ``duplicate``: its text is the query's or that of *any* positive paired with that query, after
   ``textio.normalise`` (NFKC, case, punctuation and whitespace ignored: synth's duplicate rule).
   A corpus usually holds the positives; they are not negatives. The corpus itself is reduced to
   one text per normalised form first (the first in file order), so no pair gets two copies;
2. ``rank_window``: its rank (0-based, counted after rule 1) is below ``skip_top``: the window is
   ranks ``[skip_top, candidates)``, the ranks most likely to be unlabelled positives skipped
   (FlagEmbedding's ``range_for_sampling``, e.g. 2-200 in its examples);
3. ``near_duplicate`` (off unless ``max_positive_similarity`` is set): ``cos(cand, positive) >
   max_positive_similarity`` for a positive of the query: a paraphrase of the answer;
4. ``perc_pos`` (NV-Retriever's TopK-PercPos, Moreira et al., 2024; default 0.95):
   ``sim(q, cand) > perc_pos * sim(q, positive)``. sentence-transformers'
   ``mine_hard_negatives(relative_margin=m)`` is ``perc_pos = 1 - m``;
5. ``margin_pos`` (TopK-MarginPos, off unless set): ``sim(q, cand) > sim(q, positive) - margin``.

Rules 4-5 use the pair's own positive. From the candidates that pass, the negatives are taken,
until a pair has K (``num_negatives``), from these sources in turn (``NEGATIVE_SOURCES``):

- ``"mined"``: the window ``[skip_top, candidates)``; ``sampling="top"`` takes the best K,
  ``"random"`` draws K uniformly (seeded per pair, written best first) as FlagEmbedding does;
- ``"deeper"``: ranks ``candidates .. fallback_depth``, same filters, best first: for a query the
  model still ranks badly ``sim(q, positive)`` is low and rule 4 rejects every top candidate, yet
  lower ranks pass it;
- ``"random"``: texts drawn uniformly (seeded per pair) from the corpus beyond the searched ranks,
  never a query's or positive's text (rules 3-5 are not applied to them), as FlagEmbedding falls
  back to random corpus negatives.

No pair is ever dropped: one that still has fewer than K (a small corpus, strict filters) is
written with the negatives it has, possibly none; training masks the missing ones (``neg_valid``).
Candidates that pass every filter but are not taken are counted as ``unused``, so per pair
``examined = sum(dropped) + taken + unused`` over the searched ranks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from gte_jax.encode import Embedder
from gte_jax.eval_data import doc_text
from gte_jax.models.pooling import l2_normalize
from gte_jax.ranges import MINE_RANGES
from gte_jax.search import search
from gte_jax.textio import InputError, iter_jsonl, jsonl_field, normalise

logger = logging.getLogger(__name__)


def read_pairs(path: str | epath.Path) -> list[tuple[str, str]]:
    """JSONL with ``query`` and ``positive`` (other fields ignored) -> [(query, positive)]."""
    path = epath.Path(path)
    pairs = []
    for where, record in iter_jsonl(path):
        pairs.append((jsonl_field(record, "query", where), jsonl_field(record, "positive", where)))
    if not pairs:
        raise InputError(f"{path}: no pairs found.")
    return pairs


def read_corpus_texts(path: str | epath.Path) -> list[str]:
    """JSONL with ``text`` (optional ``_id``, ``title`` as in BEIR) -> unique texts, file order
    (:func:`unique_texts`)."""
    path = epath.Path(path)
    texts = [doc_text(record, where) for where, record in iter_jsonl(path)]
    if not texts:
        raise InputError(f"{path}: the corpus is empty.")
    return unique_texts(texts)


def unique_texts(texts: Sequence[str]) -> list[str]:
    """The first text of each normalised form (``textio.normalise``), in order."""
    first: dict[str, str] = {}
    for text in texts:
        first.setdefault(normalise(text), text)
    return list(first.values())


DEFAULT_CANDIDATES = 100  # ours: the window's end; FlagEmbedding's examples search to 200
DEFAULT_FALLBACK_DEPTH = 1000  # ours
NEGATIVE_SOURCES = ("mined", "deeper", "random")
FILTERS = ("duplicate", "rank_window", "near_duplicate", "perc_pos", "margin_pos")  # in order
SAMPLINGS = ("top", "random")


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    """The settings of ``gte-jax mine``; each is the CLI flag of the same name (``_`` -> ``-``).
    Ranges: ``ranges.MINE_RANGES``; None switches a filter off."""

    num_negatives: int = 15  # release: FlagEmbedding hn_mine's negative_number
    skip_top: int = 0  # ours: keep the best; FlagEmbedding's examples skip 2
    candidates: int = DEFAULT_CANDIDATES
    fallback_depth: int = DEFAULT_FALLBACK_DEPTH
    sampling: str = "top"  # paper: NV-Retriever's TopK-*; "random": FlagEmbedding's release
    perc_pos: float | None = 0.95  # paper: NV-Retriever TopK-PercPos (95% of the positive's score)
    margin_pos: float | None = None  # ours: off; NV-Retriever's TopK-MarginPos used 0.05 (paper)
    max_positive_similarity: float | None = None  # ours: off
    seed: int = 0  # ours: seeds the window draw and the random fallback, per pair


def setting_problems(config: MiningConfig) -> list[str]:
    """One line per setting that cannot work, named by its flag (empty: none)."""
    problems = []
    for field in dataclasses.fields(config):
        value, rule = getattr(config, field.name), MINE_RANGES.get(field.name)
        if rule is None or value is None or rule.admits(value):
            continue
        flag = "--" + field.name.replace("_", "-")
        problems.append(f"{flag}={value!r}: must be {rule.describe()} ({rule.why})")
    if config.sampling not in SAMPLINGS:
        problems.append(f"--sampling={config.sampling!r}: must be one of {SAMPLINGS}")
    if not problems and not config.skip_top < config.candidates <= config.fallback_depth:
        problems.append("need --skip-top < --candidates <= --fallback-depth")
    return problems


@dataclasses.dataclass
class MinedNegatives:
    """The negatives of one pair, best first, where each came from (``NEGATIVE_SOURCES``), how
    many searched candidates each filter dropped (``FILTERS``) and how many passed unused."""

    negatives: list[str]
    sources: list[str]
    # The mining model's cosine of the query with its positive and with each negative (parallel
    # to ``negatives``): teacher scores for distillation (gte_jax/objectives/distill.py).
    pos_score: float = float("nan")
    neg_scores: list[float] = dataclasses.field(default_factory=list)
    dropped: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    unused: int = 0

    def add(self, texts: Sequence[str], source: str) -> None:
        self.negatives.extend(texts)
        self.sources.extend([source] * len(texts))


def mine_negatives(
    embedder: Embedder,
    pairs: Sequence[tuple[str, str]],
    corpus: Sequence[str],
    config: MiningConfig,
    *,
    query_prefix: str = "",
    doc_prefix: str = "",
    batch_size: int = 64,
    max_length: int | None = None,
) -> list[MinedNegatives]:
    """The negatives of each pair, one entry per pair (rules in the module docstring)."""
    problems = setting_problems(config)
    if problems:
        raise ValueError("; ".join(problems))
    corpus = unique_texts(corpus)
    queries = list(dict.fromkeys(q for q, _ in pairs))

    def encode(texts, prefix):
        return embedder.encode(texts, batch_size=batch_size, max_length=max_length, prefix=prefix)

    embeddings = (
        encode(queries, query_prefix),  # [Q, D], one row per distinct query
        encode([p for _, p in pairs], doc_prefix),  # [P, D], one row per pair
        encode(corpus, doc_prefix),  # [N, D]
    )
    return _Miner(pairs, queries, corpus, embeddings, config).mine()


# One searched candidate: (corpus index, sim(query, candidate), removed by rule 1).
_Entry = tuple[int, float, bool]


class _Miner:
    """The embeddings and per-query facts the filters read; :meth:`mine` runs the rules."""

    def __init__(self, pairs, queries, corpus, embeddings, config: MiningConfig):
        query_emb, positive_emb, corpus_emb = embeddings
        self.pairs, self.queries, self.corpus, self.config = pairs, queries, corpus, config
        self.keys = [normalise(t) for t in corpus]
        self.row_of = {q: i for i, q in enumerate(queries)}
        self.pairs_of: dict[str, list[int]] = {}
        for p, (q, _) in enumerate(pairs):
            self.pairs_of.setdefault(q, []).append(p)
        self.excluded = {
            q: {normalise(q)} | {normalise(pairs[p][1]) for p in ps}
            for q, ps in self.pairs_of.items()
        }
        self.query_emb, self.corpus_emb = query_emb, corpus_emb
        self.positive_unit = l2_normalize(np.asarray(positive_emb, np.float32))  # [P, D]
        query_unit = l2_normalize(np.asarray(query_emb, np.float32))
        rows = [self.row_of[q] for q, _ in pairs]
        self.positive_sim = np.sum(query_unit[rows] * self.positive_unit, axis=-1)  # [P]
        # The corpus holds each normalised text once: rule 1 removes at most this many.
        self.most_removed = 1 + max(len(v) for v in self.excluded.values())

    def ranked(self, rows: list[int], k: int) -> dict[int, list[_Entry]]:
        """Query row -> its searched candidates, best first, up to the ``k``-th one rule 1 keeps
        (ties by corpus index, as ``search`` orders them: a deeper search extends a shallower)."""
        if not rows:
            return {}
        n = len(self.corpus)
        scores, indices = search(
            self.query_emb[rows], self.corpus_emb, k=min(k + self.most_removed, n)
        )
        out = {}
        for r, idx, sc in zip(rows, indices, scores, strict=True):
            excluded, entries, kept = self.excluded[self.queries[r]], [], 0
            for i, s in zip(idx.tolist(), sc.tolist(), strict=True):
                if kept == k:
                    break
                duplicate = self.keys[i] in excluded
                kept += not duplicate
                entries.append((i, s, duplicate))
            out[r] = entries
        return out

    def judge(self, p: int, entries: list[_Entry], rank: int, m: MinedNegatives) -> list[int]:
        """The corpus indices of ``entries`` that pass rules 1-5 for pair ``p``, best first;
        each drop counted in ``m.dropped``. ``rank``: the rank of the first kept entry."""
        cfg = self.config
        pos = float(self.positive_sim[p])
        perc = cfg.perc_pos * pos if cfg.perc_pos is not None else np.inf
        margin = pos - cfg.margin_pos if cfg.margin_pos is not None else np.inf
        near_limit = cfg.max_positive_similarity
        near_limit = np.inf if near_limit is None else near_limit
        near = self.positive_cosines(self.pairs[p][0], [i for i, _, _ in entries])
        passed = []
        for (i, s, duplicate), c in zip(entries, near, strict=True):
            if duplicate:
                reason = "duplicate"
            else:
                reason = (
                    "rank_window" if rank < cfg.skip_top
                    else "near_duplicate" if c > near_limit
                    else "perc_pos" if s > perc
                    else "margin_pos" if s > margin
                    else None
                )  # fmt: skip
                rank += 1
            if reason is None:
                passed.append(i)
            else:
                m.dropped[reason] += 1
        return passed

    def positive_cosines(self, query: str, indices: list[int]) -> np.ndarray:
        """max over the query's positives of cos(corpus[i], positive), per index; -inf when the
        near-duplicate rule is off."""
        if self.config.max_positive_similarity is None or not indices:
            return np.full(len(indices), -np.inf)
        cand = l2_normalize(np.asarray(self.corpus_emb[indices], np.float32))  # [C, D]
        return np.max(cand @ self.positive_unit[self.pairs_of[query]].T, axis=1)  # [C]

    def choose(self, p: int, passed: list[int]) -> list[int]:
        """The window's negatives from the candidates that passed (best first)."""
        k = self.config.num_negatives
        if self.config.sampling == "top" or len(passed) <= k:
            return passed[:k]
        rng = np.random.default_rng([self.config.seed, p, 1])  # apart from the fallback's stream
        return [passed[j] for j in sorted(rng.choice(len(passed), size=k, replace=False))]

    def mine(self) -> list[MinedNegatives]:
        cfg, n = self.config, len(self.corpus)
        depth = min(cfg.candidates, n)
        deep = min(max(cfg.fallback_depth, depth), n)
        top = self.ranked(list(range(len(self.queries))), depth)
        out = []
        for p, (query, _) in enumerate(self.pairs):
            m = MinedNegatives([], [])
            passed = self.judge(p, top[self.row_of[query]], 0, m)
            chosen = self.choose(p, passed)
            m.add([self.corpus[i] for i in chosen], "mined")
            m.unused += len(passed) - len(chosen)
            out.append(m)
        short = [p for p, m in enumerate(out) if len(m.negatives) < cfg.num_negatives]
        rows = sorted({self.row_of[self.pairs[p][0]] for p in short})
        deeper = self.ranked(rows, deep) if deep > depth else {}
        for p in short:
            row = self.row_of[self.pairs[p][0]]
            searched = deeper.get(row) or top[row]
            self.fill_deeper(p, top[row], searched[len(top[row]) :], out[p])
            self.fill_random(p, {i for i, _, _ in searched}, out[p])
        self.set_scores(out)
        return out

    def set_scores(self, out: list[MinedNegatives]) -> None:
        """Each pair's cosine with its positive and with each chosen negative (the search's
        score): the teacher scores ``mine --teacher-scores`` writes."""
        index_of = {text: i for i, text in enumerate(self.corpus)}
        corpus_unit = l2_normalize(np.asarray(self.corpus_emb, np.float32))
        query_unit = l2_normalize(np.asarray(self.query_emb, np.float32))
        for m, (query, _), pos in zip(out, self.pairs, self.positive_sim, strict=True):
            q = query_unit[self.row_of[query]]
            m.pos_score = float(pos)
            m.neg_scores = [float(corpus_unit[index_of[t]] @ q) for t in m.negatives]

    def fill_deeper(self, p: int, top: list[_Entry], entries: list[_Entry], m: MinedNegatives):
        """Tops ``m`` up with the best of ``entries`` (the ranks after ``top``) that pass."""
        passed = self.judge(p, entries, sum(not d for _, _, d in top), m)
        more = passed[: self.config.num_negatives - len(m.negatives)]
        m.add([self.corpus[i] for i in more], "deeper")
        m.unused += len(passed) - len(more)

    def fill_random(self, p: int, searched: set[int], m: MinedNegatives) -> None:
        """Tops ``m`` up with random corpus texts outside ``searched``."""
        need = self.config.num_negatives - len(m.negatives)
        if need <= 0:
            return
        rng = np.random.default_rng([self.config.seed, p])
        excluded = self.excluded[self.pairs[p][0]]
        picked = _random_indices(self.keys, searched, excluded, need, rng)
        m.add([self.corpus[i] for i in picked], "random")


def _random_indices(
    keys: Sequence[str], searched: set[int], excluded: set[str], need: int, rng
) -> list[int]:
    """Up to ``need`` random corpus indices outside ``searched`` whose normalised text is not
    ``excluded``."""
    n_corpus = len(keys)
    if n_corpus - len(searched) <= 4 * need + 64:  # few left: list them
        pool = [i for i in range(n_corpus) if i not in searched and keys[i] not in excluded]
        return [int(i) for i in rng.permutation(pool)[:need]] if pool else []
    picked: list[int] = []  # a large corpus: draw and reject
    seen: set[int] = set()
    for _ in range(100 * need):
        i = int(rng.integers(n_corpus))
        if i in searched or i in seen or keys[i] in excluded:
            continue
        seen.add(i)
        picked.append(i)
        if len(picked) == need:
            break
    return picked


def mine_hard_negatives(
    embedder: Embedder, pairs, corpus, config: MiningConfig, **kwargs: Any
) -> list[list[str]]:
    """The negatives of each pair (:func:`mine_negatives` without where they came from)."""
    return [m.negatives for m in mine_negatives(embedder, pairs, corpus, config, **kwargs)]
