"""The executable specification: every op in plain PyTorch.

Each backend is tested against these functions, and these against float64 math. They accept
float64 too (for gradcheck); every other dtype is upcast to float32 before any arithmetic, which
is what "math accumulates in float32" means for the fused kernels.
"""

from __future__ import annotations

import torch

__all__ = [
    "compute_dtype",
    "transport",
    "cosine_loss",
    "transported_cosine_loss",
    "reduce_loss",
    "select_topk",
]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, otherwise float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def transport(
    p: torch.Tensor, mean: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(p - mean) @ matrix (+ bias)`` in float32 (float64 if p is float64)."""
    dtype = compute_dtype(p)
    y = (p.to(dtype) - mean.to(dtype)) @ matrix.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y


def cosine_loss(z: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-row ``1 - <z, y> / (max(|z|, eps) * max(|y|, eps))``, float32 ``[B]``.

    Differentiable with respect to ``z`` through ordinary autograd; ``y`` is treated as a
    constant (detached), as the targets are in ReLA.
    """
    dtype = compute_dtype(z, y)
    zf = z.to(dtype)
    yf = y.detach().to(dtype)
    dot = (zf * yf).sum(dim=-1)
    z_norm = torch.linalg.vector_norm(zf, dim=-1).clamp_min(eps)
    y_norm = torch.linalg.vector_norm(yf, dim=-1).clamp_min(eps)
    return 1.0 - dot / (z_norm * y_norm)


def transported_cosine_loss(
    z: torch.Tensor,
    p: torch.Tensor,
    mean: torch.Tensor,
    matrix: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``cosine_loss(z, transport(p, ...))``: the ReLA-F regression loss per row."""
    with torch.no_grad():
        y = transport(p, mean, matrix, bias)
    return cosine_loss(z, y, eps)


def reduce_loss(
    loss: torch.Tensor, weight: torch.Tensor | None = None, reduction: str = "none"
) -> torch.Tensor:
    """``none`` -> ``w * l``; ``sum`` -> ``sum(w * l)``; ``mean`` -> ``sum(w * l) / B``."""
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / loss.shape[0]


def select_topk(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the k highest (lowest) scores, ties won by the lower index, ascending order.

    A stable sort by score (descending for ``largest``) keeps equal scores in index order, so
    the first k positions are exactly the contract's set. ``-0.0`` and ``0.0`` compare equal.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    n = scores.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if torch.isnan(scores).any():
        raise ValueError("scores contains NaN")
    values = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    order = torch.sort(values, descending=largest, stable=True).indices
    return torch.sort(order[:k]).values.to(torch.int64)
