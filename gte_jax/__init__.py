"""gte-jax: multi-stage contrastive training of text-embedding models on JAX."""

__version__ = "0.1.0"
