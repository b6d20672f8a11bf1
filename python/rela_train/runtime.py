"""Where a run executes: :func:`resolve_device` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, checked
against what this machine has) and the process-group plumbing for ``torchrun``: setup with
collective timeouts, and collective failures turned into one clear message (work rank 0 does
alone while the others wait is :func:`rela_train.peers.rank0_first`).

``torchrun`` (single node or several) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads them and joins the default group with
NCCL for CUDA training and gloo for CPU training. Every collective gets ``timeout`` seconds: a rank
that dies or hangs makes the others fail with :class:`DistributedError` instead of waiting
forever.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "DistributedError",
    "agree_min",
    "check_shared_directory",
    "describe_failure",
    "is_collective_failure",
    "resolve_device",
    "setup",
]

# Fragments of the errors gloo, NCCL and the c10d store raise when a peer is gone or too slow.
_FAILURE = re.compile(
    r"gloo|nccl|connection (reset|closed|refused)|timed out|timeout|pair closure|socket|"
    r"broken pipe|watchdog|peer",
    re.IGNORECASE,
)


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died, hung or cannot be reached."""


@dataclass
class DistContext:
    world: int
    rank: int
    local_rank: int
    backend: str | None  # None for a single process
    timeout: float  # seconds per collective
    owns_group: bool  # this module created the default group (and destroys it)
    # Small CPU-side agreements (stop, skip, shared directory) go through gloo even when the
    # training group is NCCL, so they never wait on the GPU's stream. None: the default group.
    control_group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else must exist here."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available on this machine")
    return device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(device: torch.device, timeout: float) -> DistContext:
    """Join (or reuse) the default process group described by torchrun's environment.

    Args:
        device: the training device: CUDA uses NCCL (and ``cuda:LOCAL_RANK``), CPU uses gloo.
        timeout: seconds any collective may wait before it fails.
    """
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        return DistContext(
            dist.get_world_size(), dist.get_rank(), _env_int("LOCAL_RANK", 0), backend, timeout,
            owns_group=False, control_group=_control_group(backend, timeout),
        )  # fmt: skip
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    if world == 1:
        return DistContext(1, 0, local_rank, None, timeout, owns_group=False)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {' and '.join(missing)} not set; launch with torchrun "
            "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
        )
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    control = _control_group(backend, timeout)
    return DistContext(world, rank, local_rank, backend, timeout, True, control)


def _control_group(backend: str, timeout: float) -> Any:
    if backend == "gloo":
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))


def agree_min(ctx: DistContext, values: list[int]) -> list[int]:
    """The element-wise minimum of ``values`` over all ranks (a CPU collective)."""
    if ctx.world == 1:
        return list(values)
    flags = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=ctx.control_group)
    return flags.tolist()


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is what a collective raises when a peer died, hung or is unreachable."""
    if isinstance(error, DistributedError | dist.DistError):
        return True
    return isinstance(error, RuntimeError) and bool(_FAILURE.search(str(error)))


def describe_failure(ctx: DistContext, error: BaseException, checkpoint: Path) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"rank {ctx.rank} of {ctx.world}: a collective failed or waited more than "
        f"{ctx.timeout:g} s (--dist-timeout): another rank died, hung or cannot be reached; see "
        f"the other ranks' logs. The last checkpoint is {checkpoint}; continue with "
        f"`rela-train fit --resume {checkpoint.parent.parent}` (any world size whose ranks "
        f"divide the global batch). Cause: {first}"
    )


def check_shared_directory(ctx: DistContext, directory: Path) -> None:
    """Every rank must see rank 0's run directory (checkpoints, prior embeddings): a token that
    rank 0 writes must be readable by all, else raise a ValueError that says so."""
    if ctx.world == 1:
        return
    token = directory / f".rank0-token-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    nonce = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if ctx.main:
        directory.mkdir(parents=True, exist_ok=True)
        token.write_text(str(int(nonce)), encoding="utf-8")
    dist.broadcast(nonce, src=0, group=ctx.control_group)
    seen = None
    try:
        seen = int(token.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    (ok,) = agree_min(ctx, [int(seen == int(nonce))])
    if ctx.main:
        token.unlink(missing_ok=True)
    if not ok:
        raise ValueError(
            f"--out: the run directory {directory} is not shared by every rank (a rank could not "
            "read what rank 0 wrote there); put it on a file system all nodes mount"
        )
