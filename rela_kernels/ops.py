"""Public ops: argument checks, backend choice, autograd and fake kernels.

Compiled kernels are ``torch.ops.rela.*`` (schemas in csrc/rela.cpp, kernels in csrc/cpu and
csrc/cuda); the Triton kernels are registered here as ``torch.ops.rela.triton_*`` custom ops with
the same signatures. Both get the same fake (shape) kernels and autograd formula, so
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work on every backend.

The loss ops return per-row losses plus, when ``z`` needs a gradient, ``d loss_i / d z_i``
computed in the same pass; backward only scales those rows by the incoming gradient.
"""

from typing import Optional

import torch
from torch import Tensor

from rela_kernels import backends, reference
from rela_kernels._validation import (
    FLOAT_INPUT_DTYPES,
    SCORE_DTYPES,
    check_eps,
    check_k,
    check_reduction,
    check_rows,
    check_same_device,
    check_tensor,
    check_weight,
)
from rela_kernels.transport import Transport

__all__ = [
    "transport",
    "cosine_loss",
    "transported_cosine_loss",
    "select_topk",
    "score_and_select",
]

_EXTENSION, _ = backends._extension()


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by the compiled and the Triton registrations.
# --------------------------------------------------------------------------------------------


def _fake_transport(p, mean, matrix, bias):
    return p.new_empty((p.shape[0], matrix.shape[1]), dtype=torch.float32)


def _fake_loss(z, compute_grad):
    loss = z.new_empty((z.shape[0],), dtype=torch.float32)
    grad = z.new_empty(z.shape) if compute_grad else z.new_empty((0,))
    return loss, grad


def _fake_cosine_loss_fwd(z, y, eps, compute_grad):
    return _fake_loss(z, compute_grad)


def _fake_transported_cosine_loss_fwd(z, p, mean, matrix, bias, eps, compute_grad):
    return _fake_loss(z, compute_grad)


def _fake_select_topk(scores, k, largest):
    return scores.new_empty((k,), dtype=torch.int64)


def _fake_score_and_select(z, p, mean, matrix, bias, eps, k, largest):
    return z.new_empty((k,), dtype=torch.int64), z.new_empty((z.shape[0],), dtype=torch.float32)


def _save_row_gradient(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    # The row-gradient output never receives a gradient; without this autograd would fill a
    # [B, d] tensor of zeros for it on every backward.
    ctx.set_materialize_grads(False)


def _scale_row_gradient(ctx, grad_loss, grad_of_grad, n_inputs):
    (row_gradient,) = ctx.saved_tensors
    if row_gradient.numel() == 0:
        raise RuntimeError(
            "rela: backward through a loss computed with compute_grad=False; call the public op "
            "(rk.cosine_loss / rk.transported_cosine_loss) with a z that requires grad"
        )
    if grad_loss is None:
        return (None,) * n_inputs
    grad_z = (row_gradient.float() * grad_loss.unsqueeze(1)).to(row_gradient.dtype)
    return (grad_z,) + (None,) * (n_inputs - 1)


def _backward_cosine_loss(ctx, grad_loss, grad_of_grad):
    return _scale_row_gradient(ctx, grad_loss, grad_of_grad, 4)


def _backward_transported(ctx, grad_loss, grad_of_grad):
    return _scale_row_gradient(ctx, grad_loss, grad_of_grad, 7)


def _register(name, fake, backward=None):
    torch.library.register_fake(name, fake)
    if backward is not None:
        torch.library.register_autograd(name, backward, setup_context=_save_row_gradient)


if _EXTENSION is not None:
    _register("rela::transport", _fake_transport)
    _register("rela::cosine_loss_fwd", _fake_cosine_loss_fwd, _backward_cosine_loss)
    _register(
        "rela::transported_cosine_loss_fwd",
        _fake_transported_cosine_loss_fwd,
        _backward_transported,
    )
    _register("rela::select_topk", _fake_select_topk)
    _register("rela::score_and_select", _fake_score_and_select)


# Triton kernels as custom ops. The kernel module is imported on first call, so importing
# rela_kernels never imports triton.
@torch.library.custom_op("rela::triton_transport", mutates_args=())
def _triton_transport(p: Tensor, mean: Tensor, matrix: Tensor, bias: Optional[Tensor]) -> Tensor:  # noqa: UP045
    from rela_kernels.triton import cosine_loss as kernels

    return kernels.transport(p, mean, matrix, bias)


@torch.library.custom_op("rela::triton_cosine_loss_fwd", mutates_args=())
def _triton_cosine_loss_fwd(
    z: Tensor, y: Tensor, eps: float, compute_grad: bool
) -> tuple[Tensor, Tensor]:
    from rela_kernels.triton import cosine_loss as kernels

    return kernels.cosine_loss_fwd(z, y, eps, compute_grad)


@torch.library.custom_op("rela::triton_transported_cosine_loss_fwd", mutates_args=())
def _triton_transported_cosine_loss_fwd(
    z: Tensor,
    p: Tensor,
    mean: Tensor,
    matrix: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    eps: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    from rela_kernels.triton import cosine_loss as kernels

    return kernels.transported_cosine_loss_fwd(z, p, mean, matrix, bias, eps, compute_grad)


@torch.library.custom_op("rela::triton_score_and_select", mutates_args=())
def _triton_score_and_select(
    z: Tensor,
    p: Tensor,
    mean: Tensor,
    matrix: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    eps: float,
    k: int,
    largest: bool,
) -> tuple[Tensor, Tensor]:
    from rela_kernels.triton import score_select

    return score_select.score_and_select(z, p, mean, matrix, bias, eps, k, largest)


_register("rela::triton_transport", _fake_transport)
_register("rela::triton_cosine_loss_fwd", _fake_cosine_loss_fwd, _backward_cosine_loss)
_register(
    "rela::triton_transported_cosine_loss_fwd",
    _fake_transported_cosine_loss_fwd,
    _backward_transported,
)
_register("rela::triton_score_and_select", _fake_score_and_select)


def _compiled_op(name: str, backend: str):
    """The torch.ops callable of ``name`` for a compiled backend."""
    if backend == "triton":
        return getattr(torch.ops.rela, f"triton_{name}")
    return getattr(torch.ops.rela, name)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_transport(where: str, t: object, device: torch.device) -> Transport:
    if not isinstance(t, Transport):
        raise TypeError(f"{where}: t must be an rk.Transport, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(
            f"{where}: t is on {t.device} but the inputs are on {device}; use t.to({str(device)!r})"
        )
    return t


def _check_p(where: str, p: object) -> Tensor:
    p = check_tensor(where, "p", p, ndim=2, dtypes=FLOAT_INPUT_DTYPES, shape_hint="[B, Dp]")
    check_rows(where, "p", p)
    return p


def _check_p_width(where: str, p: Tensor, t: Transport) -> None:
    if p.shape[1] != t.in_dim:
        raise ValueError(
            f"{where}: p must have {t.in_dim} columns (the transport's input width), "
            f"got shape {tuple(p.shape)}"
        )


def _check_z(where: str, z: object, rows: int | None, width: int | None) -> Tensor:
    z = check_tensor(where, "z", z, ndim=2, dtypes=FLOAT_INPUT_DTYPES, shape_hint="[B, d]")
    check_rows(where, "z", z, rows)
    if width is not None and z.shape[1] != width:
        raise ValueError(
            f"{where}: z must have {width} columns (the transport's output width), "
            f"got shape {tuple(z.shape)}"
        )
    if z.shape[1] == 0:
        raise ValueError(f"{where}: z must have at least one column, got shape {tuple(z.shape)}")
    return z


def _check_transported(
    where: str, z: object, p: object, t: object
) -> tuple[Tensor, Tensor, Transport, torch.device]:
    """z [B, d], p [B, Dp] and a transport that maps Dp to d, all on one device."""
    p = _check_p(where, p)
    z = check_tensor(where, "z", z, ndim=2, dtypes=FLOAT_INPUT_DTYPES, shape_hint="[B, d]")
    device = check_same_device(where, z=z, p=p)
    t = _check_transport(where, t, device)
    _check_p_width(where, p, t)
    return _check_z(where, z, p.shape[0], t.out_dim), p, t, device


def _raise_non_finite(where: str, loss: Tensor, **inputs: Tensor) -> None:
    """Loss rows are finite whenever the inputs are; name the input that is not."""
    if torch.compiler.is_compiling() or bool(torch.isfinite(loss).all()):
        return
    for name, tensor in inputs.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"{where}: {name} must be finite, got {bad} non-finite value(s)")
    raise ValueError(f"{where}: the loss overflowed to a non-finite value")


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def transport(p: Tensor, t: Transport, *, backend: str | None = None) -> Tensor:
    """``(p - t.mean) @ t.matrix (+ t.bias)`` as float32 ``[B, d]``; no gradient."""
    where = "rk.transport"
    p = _check_p(where, p)
    t = _check_transport(where, t, p.device)
    _check_p_width(where, p, t)
    chosen = backends.resolve("transport", p.device, backend)
    with torch.no_grad():
        if chosen == "reference":
            return reference.transport(p, t.mean, t.matrix, t.bias)
        return _compiled_op("transport", chosen)(p, t.mean, t.matrix, t.bias)


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
    non-finite inputs (costs a host sync on CUDA; skipped under torch.compile).
    """
    where = "rk.cosine_loss"
    z = _check_z(where, z, None, None)
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
        loss, _ = _compiled_op("cosine_loss_fwd", chosen)(z, y.detach(), eps, compute_grad)
    if check_finite:
        _raise_non_finite(where, loss, z=z, y=y)
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
        loss, _ = _compiled_op("transported_cosine_loss_fwd", chosen)(
            z, p.detach(), t.mean, t.matrix, t.bias, eps, compute_grad
        )
    if check_finite:
        _raise_non_finite(where, loss, z=z, p=p)
    return reference.reduce_loss(loss, None if weight is None else weight.detach(), reduction)


def _check_scores(where: str, scores: object) -> Tensor:
    return check_tensor(where, "scores", scores, ndim=1, dtypes=SCORE_DTYPES, shape_hint="[N]")


def _check_no_nan(where: str, scores: Tensor) -> None:
    if not torch.compiler.is_compiling() and bool(torch.isnan(scores).any()):
        raise ValueError(
            f"{where}: scores must not contain NaN, got {int(torch.isnan(scores).sum())}"
        )


def _check_largest(where: str, largest: object) -> bool:
    if not isinstance(largest, bool):
        raise TypeError(f"{where}: largest must be a bool, got {type(largest).__name__}")
    return largest


def _select_on_device(scores: Tensor, k: int, largest: bool) -> Tensor:
    """The compiled select for ``scores``' device, or the reference where none is built.

    Triton has no select kernel of its own: on GPU the CUDA radix select is the fast path and a
    Triton copy of it would not pay, so the ``triton`` backend selects with this.
    """
    key = "CUDA" if scores.is_cuda else "CPU"
    if _EXTENSION is not None and backends._has_kernel("select_topk", key):
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
    largest = _check_largest(where, largest)
    chosen = backends.resolve("select_topk", scores.device, backend)
    if chosen != "cpu":
        # The C++ CPU kernel counts NaN during its first pass and raises this same ValueError;
        # elsewhere a separate pass looks for NaN (on CPU it would cost as much as the select).
        _check_no_nan(where, scores)
    with torch.no_grad():
        if chosen == "reference":
            return reference.select_topk(scores, k, largest)
        if chosen == "triton":
            return _select_on_device(scores, k, largest)
        return _compiled_op("select_topk", chosen)(scores, k, largest)


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
    largest = _check_largest(where, largest)
    eps = check_eps(where, eps)
    chosen = backends.resolve("score_and_select", device, backend)
    with torch.no_grad():
        if chosen == "reference":
            losses = reference.transported_cosine_loss(z, p, t.mean, t.matrix, t.bias, eps)
            _raise_non_finite(where, losses, z=z, p=p)
            return reference.select_topk(losses, k, largest), losses
        indices, losses = _compiled_op("score_and_select", chosen)(
            z, p, t.mean, t.matrix, t.bias, eps, k, largest
        )
    _raise_non_finite(where, losses, z=z, p=p)
    return indices, losses
