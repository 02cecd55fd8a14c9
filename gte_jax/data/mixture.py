"""α-multinomial mixture of pair sources (GTE §3.1: p_i ∝ n_i^α, α = 0.5).

Levanter-style determinism: which source step ``t`` draws from is a pure function of
``(seed, t)``, and the examples it takes are a per-source cursor over a permutation that is a pure
function of ``(seed, source name, epoch)``. Every process computes the same thing without talking;
the JSON state (step + cursors) only saves replaying the history on resume.

Why NumPy index math and not grain's samplers/mixers: grain's ``MapDataset.mix`` /
``IndexSampler`` mix at the *example* level and shard records per process, whereas GTE wants each
*global* batch from one source (in-batch negatives from the same task), per-source batch sizes and
every process seeing the whole global batch's texts (for exact duplicate masking). That is a few
lines of index math; grain (through TFDS ``as_data_source``) remains the record reader.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Domain-separation tags so the step stream and the permutations never share random bits.
_TAG_SOURCE = 0x5EED_0001
_TAG_PERM = 0x5EED_0002


def mixture_weights(sizes: Sequence[int], alpha: float) -> np.ndarray:
    """p_i = n_i^α / Σ_j n_j^α (α = 0: uniform over sources, α = 1: proportional to size)."""
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0 or np.any(n <= 0):
        raise ValueError(f"source sizes must be positive, got {list(sizes)}")
    w = n**alpha
    return w / w.sum()


# Sources of an earlier stage mixed into this one (``data.replay``) carry this prefix in the
# stage's mixture, its sampler state and its summary's per-source counts.
REPLAY_PREFIX = "replay/"


def is_replay(name: str) -> bool:
    return name.startswith(REPLAY_PREFIX)


def replay_weights(
    sizes: Mapping[str, int], *, alpha: float, replay_alpha: float, share: float
) -> list[float]:
    """Mixture weights (in the order of ``sizes``) with a ``share`` of the batches replayed.

    The stage's own sources split ``1 - share`` by n_i^alpha among themselves, the replayed ones
    (names with :data:`REPLAY_PREFIX`) split ``share`` by n_j^replay_alpha: one categorical over
    every source, so a step still draws one source and the replayed share of the steps is
    Binomial(steps, share)."""
    if not 0 <= share < 1:
        raise ValueError(f"replay share must be in [0, 1), got {share}")
    own = [n for n in sizes if not is_replay(n)]
    replay = [n for n in sizes if is_replay(n)]
    if not own or (share > 0 and not replay):
        raise ValueError(f"replay needs own and replayed sources, got own={own}, replayed={replay}")
    weights = dict(
        zip(own, (1 - share) * mixture_weights([sizes[n] for n in own], alpha), strict=True)
    )
    if replay:
        replayed = share * mixture_weights([sizes[n] for n in replay], replay_alpha)
        weights.update(zip(replay, replayed, strict=True))
    return [float(weights[n]) for n in sizes]


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


class MixtureSampler:
    """Draws global batches of record indices; one source per batch unless ``mixed=True``.

    Args:
      sizes: source name -> number of records (order fixes the categorical's outcome order).
      global_batch_size: examples per global batch.
      alpha: mixture exponent.
      seed: the run's data seed.
      batch_sizes: optional per-source global batch size override (single-source mode only).
      mixed: ablation mode: every example draws its own source (same weights); batches then mix
        sources and per-source batch size overrides are not allowed.
      weights: explicit mixture weights (override the α rule), normalised here.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        global_batch_size: int,
        *,
        alpha: float = 0.5,
        seed: int = 0,
        batch_sizes: Mapping[str, int | None] | None = None,
        mixed: bool = False,
        weights: Sequence[float] | None = None,
    ):
        self.names = list(sizes)
        self.sizes = [int(sizes[n]) for n in self.names]
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.mixed = bool(mixed)
        self.weights: dict[str, float] | None = None  # explicit weights, normalised
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(self.names),) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(
                    f"weights must be {len(self.names)} non-negative numbers (one per source, "
                    f"in the order {self.names}) with a positive sum, got {list(weights)}"
                )
            self.probs = w / w.sum()
            self.weights = {n: float(x) for n, x in zip(self.names, self.probs, strict=True)}
        else:
            self.probs = mixture_weights(self.sizes, self.alpha)
        overrides = {k: v for k, v in (batch_sizes or {}).items() if v}
        unknown = set(overrides) - set(self.names)
        if unknown:
            raise ValueError(f"batch size overrides for unknown sources {sorted(unknown)}")
        if mixed and overrides:
            raise ValueError("per-source batch sizes need single-source batches (mixed=False)")
        self.batch_sizes = [int(overrides.get(n, global_batch_size)) for n in self.names]
        if min(self.batch_sizes) <= 0:
            raise ValueError(f"batch sizes must be positive, got {self.batch_sizes}")
        self.global_batch_size = int(global_batch_size)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self.reset()

    # ---- pure functions of (seed, step) ------------------------------------------------------
    def _step_rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _TAG_SOURCE, step])

    def source_of_step(self, step: int) -> int:
        """Index (into ``names``) of the source global batch ``step`` is drawn from."""
        return int(self._step_rng(step).choice(len(self.names), p=self.probs))

    def sources_of_examples(self, step: int) -> np.ndarray:
        """Mixed mode: the source of each example of global batch ``step``."""
        rng = self._step_rng(step)
        return rng.choice(len(self.names), size=self.global_batch_size, p=self.probs)

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        """The order source ``source`` is read in during ``epoch``."""
        key = (source, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.names):
                self._perm_cache.clear()
            name_key = _name_key(self.names[source])
            rng = np.random.default_rng([self.seed, _TAG_PERM, name_key, epoch])
            self._perm_cache[key] = rng.permutation(self.sizes[source])
        return self._perm_cache[key]

    # ---- stateful walk -----------------------------------------------------------------------
    def reset(self) -> None:
        self.step = 0
        self.epoch = [0] * len(self.names)
        self.offset = [0] * len(self.names)
        self.drawn_batches = [0] * len(self.names)
        self.drawn_examples = [0] * len(self.names)

    def _take(self, source: int, count: int) -> np.ndarray:
        """Next ``count`` indices of ``source``, crossing into the next epoch's permutation."""
        out = []
        n = self.sizes[source]
        while count > 0:
            perm = self.permutation(source, self.epoch[source])
            k = min(count, n - self.offset[source])
            out.append(perm[self.offset[source] : self.offset[source] + k])
            self.offset[source] += k
            count -= k
            if self.offset[source] == n:
                self.epoch[source] += 1
                self.offset[source] = 0
        self.drawn_examples[source] += sum(len(o) for o in out)
        return np.concatenate(out)

    def next(self) -> list[tuple[str, int]]:
        """The next global batch as a list of ``(source name, record index)``."""
        if self.mixed:
            per_example = self.sources_of_examples(self.step)
            taken = {
                int(s): iter(self._take(int(s), int(c)))
                for s, c in zip(*np.unique(per_example, return_counts=True), strict=True)
            }
            for s in taken:
                self.drawn_batches[s] += 1
            batch = [(self.names[s], int(next(taken[int(s)]))) for s in per_example]
        else:
            s = self.source_of_step(self.step)
            self.drawn_batches[s] += 1
            batch = [(self.names[s], int(i)) for i in self._take(s, self.batch_sizes[s])]
        self.step += 1
        return batch

    # ---- state ------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """JSON-able state; :meth:`set_state` continues with exactly the batches to come."""
        return {
            "step": self.step,
            "seed": self.seed,
            "alpha": self.alpha,
            "mixed": self.mixed,
            # The mixture itself, so that set_state can refuse a resume with another mixture.
            "order": list(self.names),
            "weights": self.weights,  # None: the α rule
            "sources": {
                name: {
                    "size": self.sizes[i],
                    "batch_size": self.batch_sizes[i],
                    "prob": float(self.probs[i]),
                    "epoch": self.epoch[i],
                    "offset": self.offset[i],
                    "drawn_batches": self.drawn_batches[i],
                    "drawn_examples": self.drawn_examples[i],
                }
                for i, name in enumerate(self.names)
            },
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state``. Refuses (ValueError naming what changed) a state saved with
        another seed, batch mode, source set, source size, α, explicit weights, source order or
        per-source batch size: each would silently give another stream of batches.

        A state saved before the order, weights and batch sizes were recorded is accepted with a
        logged warning; what it holds (seed, mode, sources, sizes, α) is still checked."""
        problems = []
        if int(state["seed"]) != self.seed:
            problems.append(f"seed {state['seed']} != {self.seed}")
        if bool(state.get("mixed", False)) != self.mixed:
            problems.append("mixed-batch mode differs")
        saved = state["sources"]
        same_sources = set(saved) == set(self.names)
        if not same_sources:
            problems.append(f"sources {sorted(saved)} != {sorted(self.names)}")
        else:
            for i, name in enumerate(self.names):
                if int(saved[name]["size"]) != self.sizes[i]:
                    problems.append(f"source {name!r} size changed to {self.sizes[i]}")
                if (
                    "batch_size" in saved[name]
                    and int(saved[name]["batch_size"]) != (self.batch_sizes[i])
                ):
                    problems.append(
                        f"source {name!r} batch size changed from {saved[name]['batch_size']} "
                        f"to {self.batch_sizes[i]}"
                    )
            if "order" in state and list(state["order"]) != self.names:
                problems.append(
                    f"source order changed from {list(state['order'])} to {self.names} (the "
                    "order fixes which source each draw picks)"
                )
        saved_weights = state.get("weights")
        now_weights = self.weights
        if "weights" in state and (saved_weights is None) != (now_weights is None):
            problems.append(
                f"mixture weights changed from {saved_weights or 'the alpha rule'} to "
                f"{now_weights or 'the alpha rule'}"
            )
        elif saved_weights is not None and now_weights is not None and same_sources:
            if not all(abs(saved_weights[k] - now_weights[k]) <= 1e-12 for k in self.names):
                problems.append(f"mixture weights changed from {saved_weights} to {now_weights}")
        if saved_weights is None and now_weights is None and "alpha" in state:
            if float(state["alpha"]) != self.alpha:
                problems.append(f"alpha changed from {state['alpha']} to {self.alpha}")
        if problems:
            raise ValueError(
                "sampler state does not match this data configuration ("
                + "; ".join(problems)
                + "): resume with the run's original data config, or start a fresh run"
            )
        missing = [k for k in ("order", "weights") if k not in state]
        if missing or not all("batch_size" in saved[n] for n in self.names):
            logger.warning(
                "sampler state was saved by an older version (no source order, weights or batch "
                "sizes in it): resuming without checking them; if the mixture changed since, the "
                "batches to come differ from the original run's"
            )
        self.step = int(state["step"])
        for i, name in enumerate(self.names):
            s = state["sources"][name]
            self.epoch[i] = int(s["epoch"])
            self.offset[i] = int(s["offset"])
            self.drawn_batches[i] = int(s["drawn_batches"])
            self.drawn_examples[i] = int(s["drawn_examples"])

    def expected_shares(self) -> dict[str, float]:
        return {n: float(p) for n, p in zip(self.names, self.probs, strict=True)}
