"""A gte-jax model as an encoder that the ``mteb`` package can evaluate.

    import mteb
    from gte_jax.mteb_adapter import MTEBEncoder

    model = MTEBEncoder("runs/demo/finetune/export", query_prefix="query: ", doc_prefix="passage: ")
    mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]))

Written against mteb 2.x's ``EncoderProtocol`` (``mteb/models/models_protocols.py``, checked with
mteb 2.26): ``encode(inputs: DataLoader[BatchedInput], *, task_metadata, hf_split, hf_subset,
prompt_type=None, **kwargs) -> array``, where each batch is a dict whose ``"text"`` holds the texts
(a corpus text is already ``title + " " + text``), plus ``similarity`` / ``similarity_pairwise``
and ``mteb_model_meta``. A plain list of strings is accepted too (mteb 1.x and sentence-transformers
style). mteb is not a dependency of gte-jax: this module imports it only to build the model
metadata, and works without it.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from gte_jax import prompts as prompts_lib
from gte_jax.encode import Embedder
from gte_jax.models.pooling import l2_normalize

logger = logging.getLogger(__name__)


def _texts(inputs: Any) -> list[str]:
    """The texts of a DataLoader of ``{"text": [...]}`` batches, or of a list of strings."""
    if isinstance(inputs, str):
        raise TypeError("encode() takes a list of texts or a DataLoader, not one string.")
    texts: list[str] = []
    for item in inputs:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping) and "text" in item:
            batch = item["text"]
            texts.extend([batch] if isinstance(batch, str) else batch)
        else:
            raise TypeError(
                "expected texts or batches with a 'text' field (mteb's BatchedInput); got "
                f"{type(item).__name__}. Only text tasks are supported."
            )
    return texts


def _unit(x: Any) -> np.ndarray:
    return l2_normalize(np.asarray(x, np.float32))


class MTEBEncoder:
    """A gte-jax ``Embedder`` behind mteb's ``EncoderProtocol``.

    ``prompts`` maps mteb's prompt keys to prefixes; the first key present wins, in mteb's order:
    ``"<task name>-<query|document>"``, ``"<task name>"``, ``"<task type>-<query|document>"``,
    ``"<task type>"``, ``"query"`` / ``"document"``. The model's own prompts (those it was trained
    with, from its directory) come first, then ``prompts``; ``query_prefix`` / ``doc_prefix``, when
    given, set the last two. Similarity is cosine (what gte-jax trains for).

    Instructions: with ``instruction_template`` (a preset of
    :data:`gte_jax.prompts.INSTRUCTION_TEMPLATES` or a text with one ``{task}``), a task's
    instruction is ``instructions[<task name>]`` (a ``str``, or a dict by prompt type), else
    mteb's own (the task metadata's ``prompt``, else its task class's ``abstask_prompt``, mteb's
    ``get_instruction`` order), turned into the prompt by the template: on queries, and on
    documents too with ``instruct_documents`` (INSTRUCTOR; E5-mistral / Qwen3 leave documents
    bare). A task with an instruction uses it in place of the prompt lookup above; one without
    falls back to it. ``instruction_template`` None means the template the model was trained with
    when its export records one (instructions on), else no instructions; a template other than
    the recorded one is refused (:func:`gte_jax.prompts.resolve_template`, the rule of ``encode``,
    ``eval`` and ``mine``)."""

    def __init__(
        self,
        model: str | pathlib.Path | Embedder,
        *,
        query_prefix: str | None = None,
        doc_prefix: str | None = None,
        prompts: Mapping[str, str] | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        name: str | None = None,
        revision: str | None = None,
        instruction_template: str | None = None,
        instructions: Mapping[str, Any] | None = None,
        instruct_documents: bool = False,
    ):
        if isinstance(model, Embedder):
            self.embedder = model
            source = "gte-jax/in-memory"
        else:
            self.embedder = Embedder.from_pretrained(model)
            source = str(model)
        self.prompts = {**self.embedder.prompts, **(prompts or {})}
        if query_prefix is not None:
            self.prompts["query"] = query_prefix
        if doc_prefix is not None:
            self.prompts["document"] = doc_prefix
        self.batch_size = batch_size
        if instruction_template is not None or self.embedder.instruction_templates:
            instruction_template = self.embedder.instruction_template(instruction_template)
        self.instruction_template = instruction_template
        self.instructions = dict(instructions or {})
        self.instruct_documents = instruct_documents
        self.max_length = max_length
        # mteb caches results under the model's name: default to "gte-jax/<directory name>".
        self.name = name or f"gte-jax/{pathlib.PurePath(source).name}"
        self.revision = revision or "local"

    def prefix(self, task_metadata: Any = None, prompt_type: Any = None) -> str:
        """The prefix for one task and prompt type (mteb's priority order, see the class doc)."""
        kind = getattr(prompt_type, "value", prompt_type)
        task = getattr(task_metadata, "name", None)
        instruction = self.instruction(task_metadata, kind)
        if instruction:
            return prompts_lib.instruction_prompt(self.instruction_template, instruction)
        task_type = getattr(task_metadata, "type", None)
        keys = []
        for scope in (task, task_type):
            if scope:
                keys += [f"{scope}-{kind}"] if kind else []
                keys.append(scope)
        if kind:
            keys.append(kind)
        return next((self.prompts[k] for k in keys if k in self.prompts), "")

    def instruction(self, task_metadata: Any, kind: str | None) -> str:
        """The task's instruction for ``kind`` ("query" | "document"), or "" (class doc): ours
        from ``instructions``, else mteb's ``get_instruction`` (metadata ``prompt``, a dict by
        prompt type or one text, else the task class's ``abstask_prompt``)."""
        if self.instruction_template is None or task_metadata is None:
            return ""
        if kind == "document" and not self.instruct_documents:
            return ""
        name = getattr(task_metadata, "name", None)
        text = self.instructions.get(name) if name else None
        ours = text is not None
        if not ours:
            text = getattr(task_metadata, "prompt", None)
        if isinstance(text, Mapping):
            return (text.get(kind) or "") if kind else ""
        if text or ours or not name:
            return text or ""
        try:
            from mteb.abstasks.abstask import get_abstask_prompt
        except ImportError:
            return ""
        return get_abstask_prompt(name) or ""

    def encode(
        self,
        inputs: Iterable[Any],
        *,
        task_metadata: Any = None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """float32 [N, dim] embeddings of the texts in ``inputs`` (mteb's ``EncodeKwargs``:
        ``batch_size`` is honoured, ``show_progress_bar`` too; other keys are ignored)."""
        return self.embedder.encode(
            _texts(inputs),
            batch_size=int(kwargs.get("batch_size") or self.batch_size),
            max_length=self.max_length,
            prefix=self.prefix(task_metadata, prompt_type),
            show_progress=bool(kwargs.get("show_progress_bar", False)),
        )

    def similarity(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """Cosine similarity matrix [N1, N2]."""
        return _unit(np.atleast_2d(embeddings1)) @ _unit(np.atleast_2d(embeddings2)).T

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """Cosine of each row pair [N]."""
        return np.sum(_unit(np.atleast_2d(embeddings1)) * _unit(np.atleast_2d(embeddings2)), -1)

    @property
    def mteb_model_meta(self) -> Any:
        """``mteb.ModelMeta`` when mteb is installed (name, revision, cosine similarity, dims)."""
        try:
            from mteb.models.model_meta import ModelMeta, ScoringFunction
        except ImportError:
            return None
        config = self.embedder.model.config
        return ModelMeta.create_empty(
            {
                "name": self.name,
                "revision": self.revision,
                "embed_dim": self.embedder.model.embedding_dim,
                "max_tokens": self.embedder.max_length or config.max_length,
                "similarity_fn_name": ScoringFunction.COSINE,
                "framework": ["JAX"],
            }
        )
