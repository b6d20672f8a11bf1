"""rela-kernels: fused kernels and data selection for ReLA pretraining.

``import rela_kernels as rk``; see DESIGN.md section 3 for the op contract.
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
from rela_kernels.store import EmbeddingStore
from rela_kernels.transport import Transport

__version__ = "0.1.0"

__all__ = [
    "EmbeddingStore",
    "ScoreTable",
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
