"""The transport: a float32 affine map from prior embeddings to regression targets.

``Transport`` is the value (mean, matrix, optional bias; save/load) and ``transport(p, t)`` the op
that applies it; fitting one from embeddings lives in :mod:`rela_kernels.fitting`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

import torch

from rela_kernels import backends, reference
from rela_kernels._validation import (
    check_finite,
    check_p,
    check_p_width,
    check_same_device,
    check_tensor,
    raise_non_finite,
)
from rela_kernels.atomic_io import atomic_write
from rela_kernels.registry import compiled_op

__all__ = ["Transport", "check_transport", "transport"]

_WHERE = "rk.Transport"


class Transport:
    """``y = (p - mean) @ matrix (+ bias)``, stored as float32.

    Args:
        mean: ``[Dp]`` centre subtracted from each prior embedding.
        matrix: ``[Dp, d]`` linear map.
        bias: optional ``[d]`` offset added after the map.

    The tensors are copied (as float32, contiguous), so later changes to the arguments do not
    reach the transport. Non-finite values are rejected.
    """

    def __init__(
        self, mean: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        self._set(mean, matrix, bias)

    def _set(self, mean: object, matrix: object, bias: object) -> None:
        mean = check_tensor(_WHERE, "mean", mean, ndim=1, shape_hint="[Dp]")
        matrix = check_tensor(_WHERE, "matrix", matrix, ndim=2, shape_hint="[Dp, d]")
        if bias is not None:
            bias = check_tensor(_WHERE, "bias", bias, ndim=1, shape_hint="[d]")
        for name, value in (("mean", mean), ("matrix", matrix), ("bias", bias)):
            if value is not None and not value.is_floating_point():
                raise TypeError(f"{_WHERE}: {name} must be floating point, got {value.dtype}")
        if matrix.shape[0] != mean.shape[0]:
            raise ValueError(
                f"{_WHERE}: matrix must be [{mean.shape[0]}, d] to match mean [{mean.shape[0]}], "
                f"got {tuple(matrix.shape)}"
            )
        if matrix.shape[0] == 0 or matrix.shape[1] == 0:
            raise ValueError(f"{_WHERE}: matrix must be non-empty, got {tuple(matrix.shape)}")
        if bias is not None and bias.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"{_WHERE}: bias must be [{matrix.shape[1]}] to match matrix "
                f"{tuple(matrix.shape)}, got {tuple(bias.shape)}"
            )
        check_same_device(_WHERE, mean=mean, matrix=matrix, bias=bias)
        cast = {
            name: None if value is None else value.detach().to(torch.float32, copy=True)
            for name, value in (("mean", mean), ("matrix", matrix), ("bias", bias))
        }
        # Checked after the cast: a float64 value beyond float32's range becomes inf there.
        for name, value in cast.items():
            if value is not None:
                check_finite(_WHERE, name, value)
        self.mean = cast["mean"].contiguous()
        self.matrix = cast["matrix"].contiguous()
        self.bias = None if cast["bias"] is None else cast["bias"].contiguous()

    @property
    def in_dim(self) -> int:
        """Dp, the prior embedding width."""
        return self.matrix.shape[0]

    @property
    def out_dim(self) -> int:
        """d, the target width."""
        return self.matrix.shape[1]

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def to(self, device: torch.device | str) -> Transport:
        """A copy on ``device`` (self if it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return Transport(
            self.mean.to(device),
            self.matrix.to(device),
            None if self.bias is None else self.bias.to(device),
        )

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"mean": self.mean, "matrix": self.matrix, "bias": self.bias}

    def load_state_dict(self, state: Mapping[str, torch.Tensor | None]) -> None:
        """Replace the parameters (validated first; on error the transport is unchanged)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"{_WHERE}.load_state_dict: state must be a mapping, got {type(state)}")
        missing = {"mean", "matrix"} - set(state)
        unexpected = set(state) - {"mean", "matrix", "bias"}
        if missing or unexpected:
            raise ValueError(
                f"{_WHERE}.load_state_dict: expected keys mean, matrix[, bias]; "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        self._set(state["mean"], state["matrix"], state.get("bias"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary file, fsync, rename)."""
        buffer = io.BytesIO()
        torch.save(
            {k: None if v is None else v.cpu() for k, v in self.state_dict().items()}, buffer
        )
        atomic_write(path, lambda handle: handle.write(buffer.getvalue()))

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> Transport:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{_WHERE}.load: no transport file at {path}")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:
            raise ValueError(f"{_WHERE}.load: {path} is not a saved Transport ({error})") from error
        transport = cls.__new__(cls)
        transport.load_state_dict(state)
        return transport

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        return transport(p, self)

    def __repr__(self) -> str:
        bias = "with bias" if self.bias is not None else "no bias"
        return (
            f"Transport(in_dim={self.in_dim}, out_dim={self.out_dim}, {bias}, device={self.device})"
        )


def check_transport(where: str, t: object, device: torch.device) -> Transport:
    """``t`` is a Transport on ``device``."""
    if not isinstance(t, Transport):
        raise TypeError(f"{where}: t must be an rk.Transport, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(
            f"{where}: t is on {t.device} but the inputs are on {device}; use t.to({str(device)!r})"
        )
    return t


def transport(
    p: torch.Tensor, t: Transport, *, check_finite: bool = True, backend: str | None = None
) -> torch.Tensor:
    """``(p - t.mean) @ t.matrix (+ t.bias)`` as float32 ``[B, d]``; no gradient.

    ``check_finite`` (as for the losses) raises on a non-finite ``p``: the output is checked
    (one host sync on CUDA; skipped under torch.compile) and, when it is not finite, the input
    that caused it is named.
    """
    where = "rk.transport"
    p = check_p(where, p)
    t = check_transport(where, t, p.device)
    check_p_width(where, p, t)
    chosen = backends.resolve("transport", p.device, backend)
    with torch.no_grad():
        if chosen == "reference":
            out = reference.transport(p, t.mean, t.matrix, t.bias)
        else:
            out = compiled_op("transport", chosen)(p, t.mean, t.matrix, t.bias)
    if check_finite:
        raise_non_finite(where, out, p=p)
    return out
