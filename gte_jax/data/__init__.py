"""Input pipeline: sources, α-mixture sampler, tokenisation and batching (docs/design.md)."""
