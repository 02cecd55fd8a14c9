"""Embedding texts with a trained model: the ``Embedder`` class and the ``gte-jax encode`` command.

Texts are tokenised once. By default (``packing=True``) they are packed several to a row, as
training packs them (docs/design.md, "Packed batches"): best-fit decreasing into rows as long as
the call's longest text (its bucket; the max length for any corpus with a truncated text),
``batch_size`` rows per program, so a whole corpus runs ONE compiled shape and padding nearly
vanishes. ``packing=False`` is the padded path: sorted by length and padded to a few bucket
lengths (multiples of 16, then 32, then 64) and batch sizes (powers of two), a handful of shapes
per corpus. Either way results come back in the input order.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gte_jax import sharding as shd
from gte_jax.data.batching import pack_rows, packed_arrays
from gte_jax.models.encoder import BiEncoder
from gte_jax.models.pooling import POOLING_MODES, truncate_embeddings
from gte_jax.prompts import PromptLengths, resolve_prompt, resolve_template
from gte_jax.prompts import pool_mask as pool_mask_of
from gte_jax.workdir import inference_path, load_model

logger = logging.getLogger(__name__)


def bucket_length(n: int, max_length: int) -> int:
    """Round a token count up to the next bucket: 16-steps to 64, 32-steps to 256, then 64-steps."""
    step = 16 if n <= 64 else 32 if n <= 256 else 64
    return min(max(step, -(-n // step) * step), max_length)


def _bucket_rows(n: int, batch_size: int) -> int:
    """Rows a (last, partial) batch is padded to: the next power of two, at most batch_size."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def _padded(
    ids, type_ids, rows, n_rows: int, length: int, pad_id: int, prompt_length: int, left: bool
):
    """[n_rows, length] int32 ids, attention mask, token types (or None) and pool mask (None
    when the prompt is pooled) of the texts ``rows`` of ``ids``; ``left``: pads before the text."""
    input_ids = np.full((n_rows, length), pad_id, np.int32)
    attention_mask = np.zeros((n_rows, length), np.int32)
    token_types = np.zeros((n_rows, length), np.int32) if type_ids else None
    pool_mask = np.zeros((n_rows, length), np.int32) if prompt_length else None
    for r, i in enumerate(rows):
        n = len(ids[i])
        at = slice(length - n, length) if left else slice(0, n)
        input_ids[r, at] = ids[i]
        attention_mask[r, at] = 1
        if token_types is not None:
            token_types[r, at] = type_ids[i]
        if pool_mask is not None:  # the first prompt_length real tokens are not pooled
            pool_mask[r, at] = pool_mask_of(n, prompt_length)
    return input_ids, attention_mask, token_types, pool_mask


# Module level, graphdef static: every Embedder of one architecture shares the compiled shapes.
@functools.partial(jax.jit, static_argnames=("graphdef", "pooling", "normalize"))
def _embed(
    graphdef, state, input_ids, attention_mask, token_type_ids, pool_mask, *, pooling, normalize
):
    model = nnx.merge(graphdef, state)
    return model.embed(
        input_ids, attention_mask, token_type_ids, pool_mask, pooling=pooling, normalize=normalize
    )  # [batch, dim]


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling", "normalize"))
def _embed_packed(graphdef, state, batch, *, pooling, normalize):
    """Packed rows (``batch``: :func:`gte_jax.data.batching.packed_arrays`' keys) -> one vector
    per ``slot_index`` entry [slots, dim]."""
    model = nnx.merge(graphdef, state)
    return model.embed(
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("token_type_ids"),
        batch.get("pool_mask"),
        segment_ids=batch["segment_ids"],
        position_ids=batch["position_ids"],
        slot_index=batch["slot_index"],
        pooling=pooling,
        normalize=normalize,
    )  # [slots, dim]


def packed_plan(
    lengths: Sequence[int], batch_size: int, row_length: int
) -> tuple[int, int, list[list[list[int]]]]:
    """(rows per batch, texts per batch, batches) of one encode call: every batch of one shape.

    The texts are packed best-fit decreasing into rows of ``row_length`` tokens (the training
    packer, :func:`gte_jax.data.batching.pack_rows`). A batch is ``batch_size`` rows (the tokens
    of the padded path's largest batch at this length), fewer for a call that needs fewer: the
    next power of two of its row count, so a small call (one query) runs a small shape.
    Packed row k goes to batch k % n (as GradCache deals chunks), so every batch gets long- and
    short-text rows alike and the text counts per batch are balanced; the slot axis (texts per
    batch, the ``slot_index`` gather) is the next power of two of the largest count. Each batch is
    a list of rows of text indices."""
    rows = pack_rows(lengths, row_length)
    rows_per_batch = _bucket_rows(len(rows), batch_size)
    num_batches = -(-len(rows) // rows_per_batch)
    batches = [rows[b::num_batches] for b in range(num_batches)]
    most = max(sum(len(row) for row in batch) for batch in batches)
    return rows_per_batch, _bucket_rows(most, rows_per_batch * row_length), batches


def _packed_batch(ids, type_ids, pools, batch, rows_per_batch, slots, length, pad_id):
    """The packed model inputs of ``batch`` (rows of text indices) and the text indices in slot
    order (``slot_index`` padded to ``slots`` entries with slot 0, whose vector is dropped)."""
    members = [i for row in batch for i in row]
    local, start = [], 0
    for row in batch:
        local.append(list(range(start, start + len(row))))
        start += len(row)
    arrays = packed_arrays(
        [ids[i] for i in members],
        local,
        num_rows=rows_per_batch,
        length=length,
        pad_id=pad_id,
        pool=None if pools is None else [pools[i] for i in members],
        token_types=None if type_ids is None else [type_ids[i] for i in members],
    )
    arrays["slot_index"] = np.pad(arrays["slot_index"], (0, slots - len(members)))
    return arrays, members


class Embedder:
    """Encodes lists of texts to float32 embeddings with a ``BiEncoder`` and its tokenizer."""

    def __init__(
        self,
        model: BiEncoder,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        include_prompt: bool = True,
        prompts: dict[str, str] | None = None,
        instruction_templates: Sequence[str] = (),
        truncate_dim: int | None = None,
        mesh: Any = None,
    ):
        self.model = model
        # A mesh: the model's parameters stay as they are sharded (in-training eval: the train
        # step's shardings) and each batch is split over "data" where its rows divide.
        self.mesh = mesh
        self.tokenizer = tokenizer
        model_limit = model.config.max_length
        tokenizer_limit = getattr(tokenizer, "model_max_length", None) or model_limit
        self.max_length = min(max_length or tokenizer_limit, model_limit)
        # False: tokens of a prefix are not pooled (sentence-transformers' include_prompt).
        self.include_prompt = include_prompt
        # Named prompts (sentence-transformers' ``prompts``): encode(..., prompt_name="query").
        self.prompts = dict(prompts or {})
        # The templates training formatted instructions with (the export's record).
        self.instruction_templates = list(instruction_templates)
        self.truncate_dim: int | None = None
        self.set_truncate_dim(truncate_dim)
        self._prompt_lengths = PromptLengths(tokenizer)  # checked against the offsets, memoised
        # The tokenizer's padding side (gte_jax.prompts.configure_tokenizer), as in training.
        self.left_pad = getattr(tokenizer, "padding_side", "right") == "left"
        self._graphdef, self._state = nnx.split(model)
        # The batch shapes this Embedder has run, one compiled program each (per pooling mode):
        # (rows, length) padded, (rows, row length, texts) packed.
        self.compiled_shapes: set[tuple[int, ...]] = set()

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path, *, dtype: Any = jnp.float32) -> Embedder:
        """Load a model directory, a gte-jax workdir or a known offline model name: the one rule
        of :mod:`gte_jax.workdir` that ``encode``, ``eval``, ``mine`` and the MTEB adapter share."""
        model, tokenizer, info = load_model(inference_path(path), dtype=dtype)
        return cls.from_loaded(model, tokenizer, info)

    @classmethod
    def from_loaded(cls, model: BiEncoder, tokenizer: Any, info: Any) -> Embedder:
        """From ``(model, tokenizer, PretrainedInfo)``: the model's max length, prompts and
        ``include_prompt`` as its directory says."""
        return cls(
            model,
            tokenizer,
            max_length=info.max_seq_length,
            include_prompt=info.include_prompt,
            prompts=info.prompts,
            instruction_templates=info.instruction_templates,
            truncate_dim=info.truncate_dim,
        )

    def set_truncate_dim(self, dim: int | None) -> None:
        """Every later :meth:`encode` returns the first ``dim`` coordinates, re-normalised when the
        embedding is (:func:`gte_jax.models.pooling.truncate_embeddings`, the rule of Matryoshka
        training and of sentence-transformers' ``truncate_dim``); None: the full embedding.
        Raises ValueError for a dim outside [1, the model's dim]."""
        if dim is not None and not 1 <= int(dim) <= self.model.embedding_dim:
            raise ValueError(
                f"--dim {dim}: must be in [1, {self.model.embedding_dim}] (the model's dim)"
            )
        self.truncate_dim = None if dim is None else int(dim)

    def instruction_template(self, given: str | None = None) -> str:
        """The template this model's instructions go through: ``given`` if it is the one the
        model was trained with, else the model's (:func:`gte_jax.prompts.resolve_template`)."""
        return resolve_template(self.instruction_templates, given)

    def prompt_length(self, prompt: str) -> int:
        """Tokens of ``prompt`` left out of pooling (0 with ``include_prompt``); raises ValueError
        for a prompt the tokenizer does not split exactly (:func:`gte_jax.prompts.check_prompt`)."""
        return 0 if self.include_prompt else self._prompt_lengths(prompt)

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        max_length: int | None = None,
        prefix: str = "",
        pooling: str | None = None,
        normalize: bool | None = None,
        show_progress: bool = False,
        prompt_name: str | None = None,
        packing: bool = True,
    ) -> np.ndarray:
        """Embed ``texts`` -> float32 [len(texts), dim], in input order (dim: the model's, or
        :attr:`truncate_dim` when set).

        ``prefix`` is prepended to every text (e.g. "query: "), or ``prompt_name`` names one of
        the model's prompts (as in sentence-transformers); with ``include_prompt`` False its
        tokens are not pooled (:mod:`gte_jax.prompts`). ``pooling`` / ``normalize`` override
        the model's settings for this call. ``packing``: texts packed into ``batch_size`` rows of
        the longest text's bucket length (``max_length`` when a text is truncated), one shape per
        call (:func:`packed_plan`); False: padded batches of ``batch_size`` texts at bucket
        lengths. Both give the same embeddings (tested)."""
        if prompt_name is not None:
            if prefix:
                raise ValueError("pass prefix or prompt_name, not both")
            prefix = resolve_prompt(self.prompts, prompt_name, None)
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not one string; wrap it in a list.")
        if pooling is not None and pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLING_MODES}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        max_length = min(max_length or self.max_length, self.model.config.max_length)
        out = np.zeros((len(texts), self.model.embedding_dim), np.float32)
        if not texts:
            return out[:, : self.truncate_dim]
        encoded = self.tokenizer(
            [prefix + text for text in texts],
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
        )
        options = {
            "pooling": pooling or self.model.pooling,
            "normalize": self.model.normalize if normalize is None else normalize,
        }
        run = self._run_packed if packing else self._run_padded
        from tqdm.auto import tqdm

        with tqdm(
            total=len(texts), desc="encode", unit="text", file=sys.stderr, disable=not show_progress
        ) as bar:
            for rows, embeddings in run(
                encoded, self.prompt_length(prefix), batch_size, max_length, options
            ):
                out[rows] = embeddings
                bar.update(len(rows))
        return truncate_embeddings(out, self.truncate_dim, normalize=options["normalize"])

    def _run_padded(self, encoded, prompt_length, batch_size, max_length, options):
        """Yields (text indices, their embeddings) per padded batch (longest texts first)."""
        ids = encoded["input_ids"]
        type_ids = encoded.get("token_type_ids")
        pad_id = self.tokenizer.pad_token_id or 0
        order = np.argsort([-len(x) for x in ids], kind="stable")
        for start in range(0, len(ids), batch_size):
            rows = order[start : start + batch_size]
            length = bucket_length(max(len(ids[i]) for i in rows), max_length)
            n_rows = _bucket_rows(len(rows), batch_size)
            input_ids, attention_mask, token_types, pool_mask = _padded(
                ids, type_ids, rows, n_rows, length, pad_id, prompt_length, self.left_pad
            )
            self.compiled_shapes.add((n_rows, length))
            embeddings = _embed(
                self._graphdef,
                self._state,
                *self._on_mesh((input_ids, attention_mask, token_types, pool_mask)),
                **options,
            )
            yield rows, shd.host_value(embeddings)[: len(rows)]

    def _run_packed(self, encoded, prompt_length, batch_size, max_length, options):
        """Yields (text indices, their embeddings) per packed batch, all of one shape. A packed
        text has no padding inside it, so the padding side does not apply (pads end the row)."""
        ids = encoded["input_ids"]
        type_ids = encoded.get("token_type_ids")
        pools = [pool_mask_of(len(x), prompt_length) for x in ids] if prompt_length else None
        lengths = [len(x) for x in ids]
        # The padded path's longest bucket: max_length as soon as a text reaches it (a corpus with
        # a truncated text), less for a call of short texts (queries), so that no call costs more
        # memory than its largest padded batch, and a 10-token query on a 32k-context model does
        # not run a 32k-token row.
        length = bucket_length(max(lengths), max_length)
        rows_per_batch, slots, batches = packed_plan(lengths, batch_size, length)
        self.compiled_shapes.add((rows_per_batch, length, slots))
        pad_id = self.tokenizer.pad_token_id or 0
        for batch in batches:
            arrays, members = _packed_batch(
                ids, type_ids, pools, batch, rows_per_batch, slots, length, pad_id
            )
            embeddings = _embed_packed(
                self._graphdef, self._state, self._on_mesh(arrays), **options
            )
            yield members, shd.host_value(embeddings)[: len(members)]

    def _on_mesh(self, batch: Any) -> Any:
        """``batch``'s arrays on :attr:`mesh` (rows over "data" where they divide, else
        replicated; every process holds the same batch and cuts its own shards); as it is
        without a mesh."""
        if self.mesh is None:
            return batch
        data = self.mesh.shape[shd.DATA_AXIS]

        def one(x: np.ndarray) -> jax.Array:
            x = np.asarray(x)
            split = x.ndim > 0 and x.shape[0] % data == 0
            sharding = shd.batch_sharding(self.mesh) if split else shd.replicated(self.mesh)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(one, batch)
