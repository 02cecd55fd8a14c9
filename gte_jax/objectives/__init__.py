"""Training objectives built on the contrastive losses of :mod:`gte_jax.losses`: Matryoshka
prefixes (:mod:`.matryoshka`), a learnable temperature (:mod:`.temperature`) and distillation
from teacher scores (:mod:`.distill`). Each is a pure function of embeddings and batch arrays."""
