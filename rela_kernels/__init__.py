"""rela-kernels: fused kernels and data selection for ReLA pretraining.

``import rela_kernels as rk``; docs/ARCHITECTURE.md describes the layout and how an op goes from
its schema (csrc/rela.cpp) to the kernels, their registration (``registry``) and the public ops
(``ops``, ``transport``), with ``reference`` as the executable spec.
"""

from rela_kernels import backends, reference
from rela_kernels.fitting import fit_least_squares, fit_pca_whitening
from rela_kernels.ops import (
    cosine_loss,
    score_and_select,
    select_topk,
    transport,
    transported_cosine_loss,
)
from rela_kernels.selection import ScoreTable, StreamingTopK, SubsetSampler, select_in_batch
from rela_kernels.store import EmbeddingStore, StoreSpec
from rela_kernels.transport import Transport

__version__ = "0.1.0"

__all__ = [
    "EmbeddingStore",
    "ScoreTable",
    "StoreSpec",
    "StreamingTopK",
    "SubsetSampler",
    "Transport",
    "backends",
    "cosine_loss",
    "fit_least_squares",
    "fit_pca_whitening",
    "reference",
    "score_and_select",
    "select_in_batch",
    "select_topk",
    "transport",
    "transported_cosine_loss",
]
