"""Flax NNX models: the BERT-family tower, pooling, and the bi-encoder built from them."""

from gte_jax.models.bert import EncoderConfig, TransformerEncoder
from gte_jax.models.encoder import BiEncoder
from gte_jax.models.pooling import POOLING_MODES, l2_normalize, pool

__all__ = [
    "POOLING_MODES",
    "BiEncoder",
    "EncoderConfig",
    "TransformerEncoder",
    "l2_normalize",
    "pool",
]
