"""Masked next-token prediction (LLM2Vec §2.2), the objective of ``kind="mntp"`` stages: the
query role's masked tokens scored by the decoder's LM head (:func:`gte_jax.losses.mntp_loss_sums`),
the mean cross-entropy over the masked tokens of the whole global batch."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gte_jax import gradcache as gc
from gte_jax import losses
from gte_jax.models.decoder import head_logits
from gte_jax.objectives.base import Objective, StepInputs, Workload, register

# Scored positions per LM-head block in the MNTP loss (losses.mntp_loss_sums): the logits held at
# once are [MNTP_LOGITS_BLOCK, vocab] (256k-vocab Gemma: 512 MiB in float32). Ours.
MNTP_LOGITS_BLOCK = 512


def mntp_value_and_grad(
    model_fn: Any,
    params: Any,
    frozen: Mapping[str, Any] | None,
    batch: Mapping[str, Any],
    rng: jax.Array | None,
    num_chunks: int = 1,
    *,
    mesh: jax.sharding.Mesh | None = None,
    block_size: int = MNTP_LOGITS_BLOCK,
):
    """``((loss, metrics), grads)`` of the MNTP stage on the query role's masked tokens: the
    tower's hidden states (padded or packed rows, the model's attention mode), the LM head on
    the scored positions only, the mean cross-entropy over the masked tokens of the whole global
    batch — :func:`losses.mntp_loss`.

    The loss is a sum over tokens divided by the global count (known from the labels before any
    forward), so GradCache's chunks need no cached embeddings here: each chunk's gradient of its
    own sum / count is exact and the chunks' gradients add up (rows strided over chunks as
    GradCache's, chunk k's dropout key ``fold_in(fold_in(rng, query), k)`` as for embeddings).
    """
    inputs = gc.role_inputs(batch, "query")
    inputs.pop("slot_index", None)  # one loss term per token: the texts' slots are not needed
    count = jnp.sum(inputs["labels"][:, 1:] != losses.MNTP_IGNORE).astype(jnp.float32)
    denom = jnp.maximum(count, 1.0)

    def sums(p, rows, key):
        tower = model_fn.module(model_fn.join_params(p, frozen) if frozen else p).encoder
        hidden = tower(
            rows["input_ids"],
            rows["attention_mask"],
            position_ids=rows.get("position_ids"),
            segment_ids=rows.get("segment_ids"),
            dropout_rng=key,
        )  # [rows, L, D]
        head = functools.partial(head_logits, tower.config)
        nll, correct, _ = losses.mntp_loss_sums(
            hidden, rows["labels"], head, tower.lm_head_kernel(), block_size=block_size
        )
        return nll / denom, correct

    keys = gc.chunk_keys(rng, "query", num_chunks)
    if num_chunks == 1:
        (loss, correct), grads = jax.value_and_grad(sums, has_aux=True)(
            params, inputs, None if keys is None else keys[0]
        )
    else:
        chunks = jax.tree.map(lambda x: gc.split_chunks(x, num_chunks, mesh), inputs)

        def one(acc, xs):
            rows, key = xs
            (part, right), g = jax.value_and_grad(sums, has_aux=True)(params, rows, key)
            return jax.tree.map(jnp.add, acc, (part, right, g)), None

        zero = jnp.zeros((), jnp.float32)
        init = (zero, zero, jax.tree.map(jnp.zeros_like, params))
        (loss, correct, grads), _ = lax.scan(one, init, (chunks, keys))
    metrics = {"loss": loss, "accuracy": correct / denom, "num_masked": count}
    return (loss, metrics), grads


@dataclasses.dataclass(frozen=True)
class MNTP(Objective):
    name = "mntp"
    kind = "mntp"
    floor = 0.0  # the cross-entropy can reach 0
    mask_probability: float = 0.2  # LLM2Vec §2.2 (the config's mntp.mask_probability wins)

    def configured(self, config: Any) -> MNTP:
        return dataclasses.replace(self, mask_probability=float(config.mntp.mask_probability))

    def problems(self, config: Any) -> list[str]:
        if config.loss.learn_temperature:
            return ["loss.learn_temperature: MNTP has no temperature (kind=mntp)"]
        return []  # loss.* is unused; the stage checks are training.checks.stage_kind_problems

    def loss(self, q, d, **batch):
        raise TypeError("the MNTP objective scores tokens, not embeddings: use value_and_grad")

    def value_and_grad(self, step: StepInputs):
        return mntp_value_and_grad(
            step.model_fn, step.params, step.frozen, step.batch, step.rng, step.num_chunks,
            mesh=step.mesh,
        )  # fmt: skip

    def scored_positions(self, work: Workload) -> float:
        """Expected masked positions of a step: ``mask_probability`` x (length - 1) per full row
        (position 0 predicts nothing; special tokens, never masked, make it an upper bound)."""
        return sum(n * self.mask_probability * max(length - 1, 0) for n, length in work.towers)

    def flops(self, work: Workload) -> float:
        """The LM head on the scored positions only: per position 2·V·D forward, 2·V·D for the
        hidden state's gradient, and 2·V·D more for the head's weight gradient when it trains
        (full fine-tuning; frozen with LoRA). A tied head's matmul is the same V x D product."""
        per_position = (6 if work.trains_head else 4) * work.vocab * work.hidden
        return self.scored_positions(work) * per_position

    def memory_bytes(self, work: Workload) -> float:
        """One block of LM-head logits, [MNTP_LOGITS_BLOCK, V] float32."""
        return float(MNTP_LOGITS_BLOCK * work.vocab * 4)


OBJECTIVE = register(MNTP())
