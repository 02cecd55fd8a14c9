"""Training: the one loop every stage runs, in parts a reader can name before opening them.

``optimizer`` (AdamW and its schedule), ``state`` (the train state and where it lives), ``step``
(the pure train step and the one builder of its jitted, sharded form: ``train`` runs it,
``plan`` compiles it for a TPU), ``checks`` (start-up refusals), ``setup`` (a stage's data,
model, state and step), ``hooks`` (what runs around the step, each with its own interval),
``evaluator`` (in-training evaluation), ``summary`` (the run summary and JSON helpers) and
``loop`` (setup -> step -> hooks -> finish). ``spec`` holds the typed stage specs every part
reads (parsed and checked once at the command line). Only ``gte_jax/commands/`` import ``loop``.
"""
