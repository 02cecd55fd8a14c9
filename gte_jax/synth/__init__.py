"""Synthetic training data from an LLM: E5-mistral's two-step prompting (Wang et al., 2024).

Step 1 (``brainstorm``) asks the LLM for a pool of tasks per category; step 2 (``generate``) asks,
per (task, example index), for one JSON training example under placeholders drawn from the
example's own seed. Any OpenAI-compatible chat-completions endpoint serves (vLLM, SGLang,
llama.cpp's server, hosted APIs).

- :mod:`gte_jax.synth.templates`: the prompt files of every category (``gte_jax/resources/synth/``),
  placeholder sampling, the per-example seed.
- :mod:`gte_jax.synth.client`: the HTTP client: retries with backoff on 429 / 5xx / timeouts, a
  request budget, token accounting.
- :mod:`gte_jax.synth.validate`: what a reply must be to become an example (reject reasons), the
  normalised text hash for duplicates, the script check of a language.
- :mod:`gte_jax.synth.store`: the output directory: append-only JSONL, torn-line repair, the ids
  already done, the settings a directory was made with, the summary.
- :mod:`gte_jax.synth.run`: the two steps, with bounded concurrency and results written in job
  order (so a rerun after a kill writes exactly what an uninterrupted run writes).
"""
