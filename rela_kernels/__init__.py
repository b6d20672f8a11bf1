"""rela-kernels: fused kernels and data selection for ReLA pretraining.

``import rela_kernels as rk``; see DESIGN.md section 3 for the op contract.
"""

from rela_kernels import backends, reference
from rela_kernels.ops import (
    cosine_loss,
    score_and_select,
    select_topk,
    transport,
    transported_cosine_loss,
)
from rela_kernels.transport import Transport

__version__ = "0.1.0"

__all__ = [
    "Transport",
    "backends",
    "cosine_loss",
    "reference",
    "score_and_select",
    "select_topk",
    "transport",
    "transported_cosine_loss",
]
