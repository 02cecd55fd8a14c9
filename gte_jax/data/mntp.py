"""Masked next-token prediction (MNTP, LLM2Vec §2.2): which tokens of a text batch are masked.

LLM2Vec adapts a decoder to bidirectional attention by masking a fraction of the tokens and
predicting masked token i from the model's output at position i − 1 (the causal LM head's own
shift; :func:`gte_jax.losses.mntp_loss`). Its settings, per model (llm2vec train_configs/mntp):
mask probability 0.2 for Llama-2/3 with BERT's 80 % mask / 10 % random / 10 % kept replacement
(``mask_all=False``), 0.8 for Mistral with every chosen token replaced (``mask_all=True``); the
mask token is ``"_"`` (decoders have no [MASK]; "eos" and a tokenizer's own mask token also
work here, :func:`resolve_mask_token_id`).

Which tokens: never a special token (BOS/EOS/pad ... as LLM2Vec, which passes the tokenizer's
special-tokens mask), and never a text's first token: its prediction would come from the
position before the text, which in a packed row is the previous text (one rule for padded and
packed rows; LLM2Vec's tokenizers put BOS there anyway).

Reproducibility: the mask of a text is a pure function of ``(seed, step, e)``, e the text's
index in the *global* batch, drawn before any packing or padding. So 1 or 8 devices, 1 or 2
processes, padded or packed rows, a resumed run: the same tokens are masked and replaced.
Labels are the original ids at masked positions and ``IGNORE`` (-100, as torch) elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gte_jax.data.layout import BatchLayout
from gte_jax.errors import ConfigError

IGNORE = -100  # label of a position without a loss term (torch's ignore_index)
_TAG_MNTP = 0x5EED_0003  # domain separation from the sampler's streams (gte_jax/data/mixture.py)
MASK_TOKEN_BLANK = "_"  # LLM2Vec's "blank" mask token


@dataclasses.dataclass(frozen=True)
class MntpMasking:
    """The masking rule of one run.

    mask_probability: chance that a maskable token is chosen (LLM2Vec: 0.2 or 0.8, per model).
    mask_token_id: what a chosen token becomes (:func:`resolve_mask_token_id`).
    special_ids: ids never masked (the tokenizer's ``all_special_ids``).
    vocab_size: the range of BERT-style random replacements (``mask_all=False``).
    mask_all: True: every chosen token becomes the mask token (LLM2Vec's "all_mask");
      False: 80 % the mask token, 10 % a random id, 10 % unchanged (BERT's rule).
    seed: the run's data seed.
    """

    mask_probability: float
    mask_token_id: int
    special_ids: frozenset[int] = frozenset()
    vocab_size: int = 0
    mask_all: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.mask_probability <= 1.0:
            raise ConfigError(f"mask_probability={self.mask_probability}: must be in (0, 1]")
        if self.mask_token_id < 0:
            raise ConfigError(f"mask_token_id={self.mask_token_id}: must be a token id (>= 0)")
        if not self.mask_all and self.vocab_size <= 0:
            raise ConfigError("mask_all=False replaces 10 % with random ids: give vocab_size")

    def mask_text(self, ids: Sequence[int], *, step: int, example: int):
        """(masked ids, labels) of one text, ``example`` its index in the global batch."""
        rng = np.random.default_rng([self.seed, _TAG_MNTP, int(step), int(example)])
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        chosen = rng.random(n) < self.mask_probability  # one draw per position, always
        maskable = ~np.isin(ids, list(self.special_ids)) & (np.arange(n) > 0)
        chosen &= maskable
        labels = np.where(chosen, ids, IGNORE)
        out = ids.copy()
        if self.mask_all:
            out[chosen] = self.mask_token_id
        else:  # BERT: 80 % mask, 10 % random, 10 % unchanged (drawn for every position)
            kind = rng.random(n)
            random_ids = rng.integers(0, self.vocab_size, n)
            out[chosen & (kind < 0.8)] = self.mask_token_id
            swap = chosen & (kind >= 0.8) & (kind < 0.9)
            out[swap] = random_ids[swap]
        return out.tolist(), labels.tolist()

    def __call__(
        self,
        texts: Sequence[Sequence[int]],
        *,
        step: int,
        first_example: int = 0,
        examples: Sequence[int] | None = None,
    ):
        """(masked ids, labels) for texts of a global batch: text i is example ``examples[i]``
        (a process's rows of the batch), or ``first_example + i`` without ``examples``."""
        if examples is None:
            examples = range(first_example, first_example + len(texts))
        pairs = [
            self.mask_text(ids, step=step, example=int(e))
            for ids, e in zip(texts, examples, strict=True)
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def resolve_mask_token_id(tokenizer, mask_token: str = MASK_TOKEN_BLANK, mask_token_id: int = -1):
    """The id a masked token becomes: ``mask_token_id`` when >= 0; else ``mask_token``: "mask"
    (the tokenizer's own mask token), "eos", or a token string that is one known token (LLM2Vec's
    default "_"). An unknown token is a :class:`ConfigError`, not a silent [UNK]."""
    if mask_token_id >= 0:
        return int(mask_token_id)
    if mask_token in ("mask", "eos"):
        found = tokenizer.mask_token_id if mask_token == "mask" else tokenizer.eos_token_id
        if found is None:
            raise ConfigError(f"mask_token={mask_token!r}: the tokenizer has no {mask_token} token")
        return int(found)
    found = tokenizer.convert_tokens_to_ids(mask_token)
    if found is None or (found == tokenizer.unk_token_id and mask_token != tokenizer.unk_token):
        raise ConfigError(
            f"mask_token={mask_token!r} is not a token of the tokenizer: use 'eos', 'mask', "
            "another token string, or mask_token_id"
        )
    return int(found)


def masking_from_config(mntp_cfg, tokenizer, seed: int) -> MntpMasking:
    """The run's :class:`MntpMasking` from a config's ``mntp`` group (gte_jax/defaults.py)."""
    return MntpMasking(
        mask_probability=float(mntp_cfg.mask_probability),
        mask_token_id=resolve_mask_token_id(
            tokenizer, str(mntp_cfg.mask_token), int(mntp_cfg.mask_token_id)
        ),
        special_ids=frozenset(int(i) for i in tokenizer.all_special_ids),
        vocab_size=len(tokenizer),
        mask_all=bool(mntp_cfg.mask_all),
        seed=int(seed),
    )


def label_rows(
    batch: dict[str, np.ndarray],
    labels: Sequence[Sequence[int]],
    role: str = "query",
    layout: BatchLayout | None = None,
) -> np.ndarray:
    """Per-text labels laid out like ``role``'s tokens in the process's ``batch`` (its
    ``layout``'s blocks; default one block): padded rows (text i in row i from column 0) or
    packed rows (text i in the segment its global ``slot_index`` names); ``IGNORE`` on pads.
    [rows, L] int32, the shape of ``<role>_input_ids``."""
    ids = batch[f"{role}_input_ids"]
    if ids.ndim != 2:
        raise ValueError(
            f"{role}: MNTP labels need padded [B, L] or packed [R, L] rows, got {ids.shape} "
            "(GradCache-chunked packing is for contrastive losses)"
        )
    out = np.full(ids.shape, IGNORE, dtype=np.int32)
    slots = batch.get(f"{role}_slot_index")
    if slots is None:
        for i, lab in enumerate(labels):
            out[i, : len(lab)] = lab
        return out
    rows, length = ids.shape
    layout = layout or BatchLayout((0,), 1)
    per_block = rows // layout.groups
    where = {b: i for i, b in enumerate(layout.blocks)}
    segments = batch[f"{role}_segment_ids"]
    for lab, slot in zip(labels, slots, strict=True):
        r, s = divmod(int(slot), length)  # slot indices count rows over all data blocks
        block, within = divmod(r, per_block)
        local = where[block] * per_block + within
        cols = np.flatnonzero(segments[local] == s + 1)
        if len(cols) != len(lab):
            raise ValueError(f"text at slot {slot} has {len(cols)} tokens, {len(lab)} labels")
        out[local, cols] = lab
    return out
