"""The valid range of every numeric setting of a training stage, in one table.

A value outside its range is refused at start-up (exit 2, one line per setting naming the key,
the value and the range) before anything is read or written: a negative step count, learning
rate or batch size would otherwise train nonsense silently or fail deep inside the run.
``tests/test_run_failures.py`` walks every numeric key of the schema (gte_jax/defaults.py,
gte_jax/data/pipeline.py) and fails for a key without an entry here.

Keys of a data source (``data.sources[i].<field>``) are written ``data.sources[].<field>``.
Ranges say what the code can do; which value a recipe picks (paper / release / ours) is said
in the defaults and the configs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_INF = math.inf


@dataclasses.dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (``<`` where open), or one of ``also`` (a sentinel such as -1)."""

    low: float = -_INF
    high: float = _INF
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()
    why: str = ""

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        if math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == _INF:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.low == -_INF:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = (
                f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}"
            )
        if self.also:
            text = " or ".join(_num(a) for a in self.also) + f" or {text}"
        return text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _at_least(low: float, why: str, *, also: tuple[float, ...] = ()) -> Range:
    return Range(low=low, also=also, why=why)


def _positive(why: str) -> Range:
    return Range(low=0, low_open=True, why=why)


def _rate(why: str, *, also: tuple[float, ...] = ()) -> Range:
    """A probability that must leave something: [0, 1)."""
    return Range(low=0, high=1, high_open=True, also=also, why=why)


RANGES: dict[str, Range] = {
    # train
    "train.batch_size": _at_least(1, "global examples per step"),
    "train.num_steps": _at_least(0, "0: derived from train.epochs"),
    "train.epochs": _at_least(0, "passes over the data when train.num_steps=0"),
    "train.learning_rate": _at_least(0, "a negative rate climbs the loss"),
    "train.warmup_ratio": Range(0, 1, why="a share of the run's steps"),
    "train.warmup_steps": _at_least(0, "> 0 wins over train.warmup_ratio"),
    "train.weight_decay": _at_least(0, "a negative decay grows the weights"),
    "train.adam_b1": _rate("Adam's moment decay"),
    "train.adam_b2": _rate("Adam's moment decay"),
    "train.adam_eps": _positive("Adam divides by sqrt(v) + eps"),
    "train.max_grad_norm": _at_least(0, "0: no clipping"),
    "train.seed": _at_least(0, "NumPy and JAX seeds are unsigned"),
    "train.gradcache_chunk_size": _at_least(0, "0: one chunk"),
    "train.log_every": _at_least(0, "steps between metric lines; 0 logs every step"),
    "train.max_consecutive_nonfinite": _at_least(1, "NaN/Inf steps in a row before stopping"),
    # checkpoint
    "checkpoint.every_steps": _at_least(0, "0: only at the end and on SIGTERM"),
    "checkpoint.max_to_keep": _at_least(1, "a resume needs the newest checkpoint"),
    # loss
    "loss.temperature": _positive("GTE uses 0.01, MNRL 0.05; τ < 0 trains the embeddings apart"),
    "loss.distill_weight": _at_least(0, "weight of the KL to the teacher; 0: off"),
    "loss.teacher_temperature": _positive("softmax temperature of the teacher scores"),
    "loss.temperature_min": _positive("the learnable τ's lower bound"),
    "loss.temperature_max": _positive("the learnable τ's upper bound"),
    "loss.temperature_learning_rate": _at_least(0, "Adam's rate for the learnable τ's θ"),
    # model
    "model.dropout": _rate("-1: the checkpoint's own rate", also=(-1,)),
    "model.attention_dropout": _rate("-1: the checkpoint's own rate", also=(-1,)),
    "model.lora.rank": _at_least(1, "E5-mistral: 16"),
    "model.lora.alpha": _positive("the LoRA scale is alpha / rank"),
    "model.lora.dropout": _rate("dropout on the LoRA input"),
    # mntp
    "mntp.mask_probability": Range(0, 1, low_open=True, why="the share of tokens masked"),
    "mntp.mask_token_id": _at_least(0, "-1: from mntp.mask_token", also=(-1,)),
    # mesh
    "mesh.data": _at_least(1, "-1: every device", also=(-1,)),
    "mesh.model": _at_least(1, "devices per tensor-parallel group"),
    "mesh.slices": _at_least(1, "TPU slices joined by DCN; mesh.data must be a multiple"),
    # eval
    "eval.batch_size": _at_least(1, "texts per encode batch"),
    "eval.every_steps": _at_least(0, "0: only at the end"),
    "eval.max_length": _at_least(0, "0: the model's own max length"),
    # export
    "export.interpolate_weight": Range(0, 1, why="the weight on export.interpolate_from"),
    # data
    "data.alpha": _at_least(0, "p_i ∝ n_i^alpha: 0 is uniform, 1 proportional (GTE: 0.5)"),
    "data.seed": _at_least(0, "NumPy seeds are unsigned"),
    "data.max_length": _at_least(0, "0: query_max_length / doc_max_length"),
    "data.query_max_length": _at_least(1, "tokens per query"),
    "data.doc_max_length": _at_least(1, "tokens per document"),
    "data.min_bucket": _at_least(1, "the shortest padded length"),
    "data.bucket_multiple": _at_least(0, "0: powers of two"),
    "data.packing_row_multiple": _at_least(1, "packed rows are a multiple of it"),
    "data.packing_estimate_batches": _at_least(0, "0: rows per batch"),
    "data.packing_row_length": _at_least(0, "0: fitted to the data; else tokens per row"),
    "data.max_text_chars": _at_least(1, "longer texts are skipped or refused"),
    "data.prefetch": _at_least(0, "batches prepared ahead in a thread; 0: off"),
    "data.max_direct_file_bytes": _at_least(1, "larger local files: gte-jax data build"),
    "data.replay.share": _rate("the share of steps drawn from replayed sources; 0: off"),
    "data.replay.alpha": _at_least(0, "among the replayed sources; -1: data.alpha", also=(-1,)),
    "data.sources[].batch_size": _at_least(0, "0: the run's train.batch_size"),
    "data.sources[].num_negatives": _at_least(0, "-1: as many as the records have", also=(-1,)),
}


# ``gte-jax mine`` (gte_jax/mining.py ``MiningConfig``): not a training stage's key, checked by
# ``mining.setting_problems`` at the command's start; ``tests/test_mining.py`` walks the fields.
MINE_RANGES: dict[str, Range] = {
    "num_negatives": _at_least(1, "K negatives per pair"),
    "skip_top": _at_least(0, "the rank window starts here (0: the best candidate)"),
    "candidates": _at_least(1, "the rank window ends before this rank"),
    "fallback_depth": _at_least(1, "ranks searched for pairs still short of K"),
    "perc_pos": _positive("drop sim(q, c) > perc_pos x sim(q, positive); NV-Retriever: 0.95"),
    "margin_pos": Range(
        -2, 2, why="drop sim(q, c) > sim(q, positive) - margin; cosines differ by <= 2"
    ),
    "max_positive_similarity": Range(-1, 1, why="drop cos(c, positive) > this; a cosine"),
    "seed": _at_least(0, "NumPy seeds are unsigned"),
}


# Config lists whose elements are data sources (data.sources' fields).
_SOURCE_LISTS = ("data.sources", "data.replay.sources")


def _leaves(node: Any, prefix: str = ""):
    """(dotted key, value) of every setting of a config group, sources as ``data.sources[]``."""
    for key in node.keys():
        value, path = node[key], f"{prefix}{key}"
        if hasattr(value, "keys"):
            yield from _leaves(value, f"{path}.")
        elif path in _SOURCE_LISTS and isinstance(value, (list, tuple)):
            for i, source in enumerate(value):
                for field, v in dict(source).items():
                    yield f"{path}[{i}].{field}", v
        else:
            yield path, value


def _table_key(key: str) -> str:
    """A source's field is ranged as ``data.sources[].<field>``, replayed ones included."""
    for prefix in _SOURCE_LISTS:
        if key.startswith(prefix + "["):
            return "data.sources[]." + key.split("].", 1)[1]
    return key


def range_problems(config: Any, prefix: str = "") -> list[str]:
    """One line per numeric setting of one stage's config outside its range (empty: none)."""
    problems = []
    for key, value in _leaves(config):
        rule = RANGES.get(_table_key(key))
        if rule is None or value is None or isinstance(value, str) or rule.admits(value):
            continue  # a string where a number belongs is the schema check's to refuse
        problems.append(f"{prefix}{key}={value!r}: must be {rule.describe()} ({rule.why})")
    return problems
