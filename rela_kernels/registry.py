"""Registration of the ``torch.ops.rela.*`` ops: fake (shape) kernels, autograd, Triton custom ops.

Compiled kernels are ``torch.ops.rela.*`` (schemas in csrc/rela.cpp, kernels in csrc/cpu and
csrc/cuda); the Triton kernels are registered here as ``torch.ops.rela.triton_*`` custom ops with
the same signatures. Both get the same fake kernels and autograd formula, so
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work on every backend.

The loss ops return per-row losses plus, when ``z`` needs a gradient, ``d loss_i / d z_i``
computed in the same pass; backward only scales those rows by the incoming gradient.

To add an op: its schema and kernels in csrc/, a ``_fake_*`` here, one ``_register`` call in the
compiled block (and, for a Triton kernel, a ``custom_op`` plus its ``_register`` call below it).
"""

from typing import Optional

import torch
from torch import Tensor

from rela_kernels import backends

__all__ = ["EXTENSION", "compiled_op"]

EXTENSION, _ = backends._extension()


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


if EXTENSION is not None:
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


def compiled_op(name: str, backend: str):
    """The torch.ops callable of ``name`` for a compiled backend."""
    if backend == "triton":
        return getattr(torch.ops.rela, f"triton_{name}")
    return getattr(torch.ops.rela, name)
