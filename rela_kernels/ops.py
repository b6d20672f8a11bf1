"""Public loss and selection ops: argument checks, backend choice, then the kernel.

The kernels are ``torch.ops.rela.*`` (registered, with their fake kernels and autograd formula, in
:mod:`rela_kernels.registry`) or the pure-PyTorch spec in :mod:`rela_kernels.reference`. The
``transport`` op lives next to the Transport value in :mod:`rela_kernels.transport`.
"""

import torch
from torch import Tensor

from rela_kernels import backends, reference
from rela_kernels._validation import (
    FLOAT_INPUT_DTYPES,
    SCORE_DTYPES,
    check_eps,
    check_k,
    check_largest,
    check_no_nan,
    check_p,
    check_p_width,
    check_reduction,
    check_same_device,
    check_tensor,
    check_weight,
    check_z,
    raise_non_finite,
)
from rela_kernels.registry import EXTENSION, compiled_op
from rela_kernels.transport import Transport, check_transport, transport

__all__ = [
    "transport",
    "cosine_loss",
    "transported_cosine_loss",
    "select_topk",
    "score_and_select",
]

# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_transported(
    where: str, z: object, p: object, t: object
) -> tuple[Tensor, Tensor, Transport, torch.device]:
    """z [B, d], p [B, Dp] and a transport that maps Dp to d, all on one device."""
    p = check_p(where, p)
    z = check_tensor(where, "z", z, ndim=2, dtypes=FLOAT_INPUT_DTYPES, shape_hint="[B, d]")
    device = check_same_device(where, z=z, p=p)
    t = check_transport(where, t, device)
    check_p_width(where, p, t)
    return check_z(where, z, p.shape[0], t.out_dim), p, t, device


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def cosine_loss(
    z: Tensor,
    y: Tensor,
    *,
    weight: Tensor | None = None,
    reduction: str = "none",
    eps: float = 1e-8,
    check_finite: bool = True,
    backend: str | None = None,
) -> Tensor:
    """``1 - cos(z_i, y_i)`` per row (torch's cosine_similarity clamping), float32.

    ``reduction``: ``none`` -> ``[B]`` (times ``weight``), ``sum`` -> ``sum(w*l)``,
    ``mean`` -> ``sum(w*l) / B``. Gradients flow to ``z`` only. ``check_finite`` raises on
    non-finite inputs, ``weight`` included (costs a host sync on CUDA; skipped under
    torch.compile).
    """
    where = "rk.cosine_loss"
    z = check_z(where, z, None, None)
    y = check_tensor(where, "y", y, ndim=2, dtypes=FLOAT_INPUT_DTYPES, shape_hint="[B, d]")
    if y.shape != z.shape:
        raise ValueError(f"{where}: y must have z's shape {tuple(z.shape)}, got {tuple(y.shape)}")
    device = check_same_device(where, z=z, y=y)
    weight = check_weight(where, weight, z.shape[0], device)
    reduction = check_reduction(where, reduction)
    eps = check_eps(where, eps)
    chosen = backends.resolve("cosine_loss", device, backend)
    if chosen == "reference":
        loss = reference.cosine_loss(z, y, eps)
    else:
        compute_grad = torch.is_grad_enabled() and z.requires_grad
        loss, _ = compiled_op("cosine_loss_fwd", chosen)(z, y.detach(), eps, compute_grad)
    if check_finite:
        raise_non_finite(where, loss, weight, z=z, y=y)
    return reference.reduce_loss(loss, None if weight is None else weight.detach(), reduction)


def transported_cosine_loss(
    z: Tensor,
    p: Tensor,
    t: Transport,
    *,
    weight: Tensor | None = None,
    reduction: str = "none",
    eps: float = 1e-8,
    check_finite: bool = True,
    backend: str | None = None,
) -> Tensor:
    """``cosine_loss(z, transport(p, t))`` fused: the targets are never materialised.

    ``z``: ``[B, d]`` predictions (gradient flows here); ``p``: ``[B, Dp]`` prior embeddings;
    ``t``: the transport. Same ``weight`` / ``reduction`` / ``eps`` as :func:`cosine_loss`.
    """
    where = "rk.transported_cosine_loss"
    z, p, t, device = _check_transported(where, z, p, t)
    weight = check_weight(where, weight, z.shape[0], device)
    reduction = check_reduction(where, reduction)
    eps = check_eps(where, eps)
    chosen = backends.resolve("transported_cosine_loss", device, backend)
    if chosen == "reference":
        loss = reference.transported_cosine_loss(z, p, t.mean, t.matrix, t.bias, eps)
    else:
        compute_grad = torch.is_grad_enabled() and z.requires_grad
        loss, _ = compiled_op("transported_cosine_loss_fwd", chosen)(
            z, p.detach(), t.mean, t.matrix, t.bias, eps, compute_grad
        )
    if check_finite:
        raise_non_finite(where, loss, weight, z=z, p=p)
    return reference.reduce_loss(loss, None if weight is None else weight.detach(), reduction)


def _check_scores(where: str, scores: object) -> Tensor:
    return check_tensor(where, "scores", scores, ndim=1, dtypes=SCORE_DTYPES, shape_hint="[N]")


def _select_on_device(scores: Tensor, k: int, largest: bool) -> Tensor:
    """The compiled select for ``scores``' device, or the reference where none is built.

    Triton has no select kernel of its own: on GPU the CUDA radix select is the fast path and a
    Triton copy of it would not pay, so the ``triton`` backend selects with this.
    """
    key = "CUDA" if scores.is_cuda else "CPU"
    if EXTENSION is not None and backends._has_kernel("select_topk", key):
        return torch.ops.rela.select_topk(scores, k, largest)
    return reference.select_topk(scores, k, largest)


def select_topk(
    scores: Tensor, k: int, *, largest: bool = True, backend: str | None = None
) -> Tensor:
    """int64 ``[k]``: indices of the k highest (lowest) scores, ascending.

    Ties are won by the lower index, so every backend returns the same set; ``-0.0`` ties with
    ``0.0`` and ``±inf`` are ordinary values. NaN raises ValueError.
    """
    where = "rk.select_topk"
    scores = _check_scores(where, scores)
    k = check_k(where, k, scores.shape[0])
    largest = check_largest(where, largest)
    chosen = backends.resolve("select_topk", scores.device, backend)
    if chosen != "cpu":
        # The C++ CPU kernel counts NaN during its first pass and raises this same ValueError;
        # elsewhere a separate pass looks for NaN (on CPU it would cost as much as the select).
        check_no_nan(where, "scores", scores)
    with torch.no_grad():
        if chosen == "reference":
            return reference.select_topk(scores, k, largest)
        if chosen == "triton":
            return _select_on_device(scores, k, largest)
        return compiled_op("select_topk", chosen)(scores, k, largest)


def score_and_select(
    z: Tensor,
    p: Tensor,
    t: Transport,
    k: int,
    *,
    largest: bool = True,
    eps: float = 1e-8,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(indices[k], losses[B])``: every row's transported cosine loss and their top-k.

    One pass over ``p``; no gradient. Indices follow :func:`select_topk`'s contract.
    """
    where = "rk.score_and_select"
    z, p, t, device = _check_transported(where, z, p, t)
    k = check_k(where, k, z.shape[0])
    largest = check_largest(where, largest)
    eps = check_eps(where, eps)
    chosen = backends.resolve("score_and_select", device, backend)
    with torch.no_grad():
        if chosen == "reference":
            losses = reference.transported_cosine_loss(z, p, t.mean, t.matrix, t.bias, eps)
            raise_non_finite(where, losses, z=z, p=p)
            return reference.select_topk(losses, k, largest), losses
        indices, losses = compiled_op("score_and_select", chosen)(
            z, p, t.mean, t.matrix, t.bias, eps, k, largest
        )
    raise_non_finite(where, losses, z=z, p=p)
    return indices, losses
