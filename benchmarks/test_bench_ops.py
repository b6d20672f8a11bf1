"""The op benchmarks as pytest-benchmark suites (`make bench`).

Each group times one op at one shape: every compiled backend usable on the device next to the
baseline a user would otherwise write (eager torch, torch.topk, reading ``p`` once). On a CUDA
device the shapes are the GPU targets' (fused loss B=65536, Dp=768, d=256 bf16; select_topk
N=1e7 and 1e8; score_and_select N=2^20); on CPU they are small, so the suite runs in a minute.
Collected only when named (the default test path is tests/); the JSON goes beside the JSONL
records in benchmarks/results/, which remain the source of the README's figures.
"""

from __future__ import annotations

import pytest
import torch

import rela_kernels as rk
from benchmarks.bench_loss import eager_loss, loss_backends
from benchmarks.bench_select import eager_score_and_select
from benchmarks.common import environment

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
LOSS_SHAPE = (65536, 768, 256) if ON_CUDA else (4096, 256, 64)  # B, Dp, d
LOSS_DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
SELECT_SIZES = (10**7, 10**8) if ON_CUDA else (10**5, 10**6)
FRACTIONS = (0.01, 0.1, 0.5)
SCORE_SHAPE = (1 << 20, 768, 256) if ON_CUDA else (8192, 256, 64)  # N, Dp, d
ROUNDS, WARMUP = (20, 3) if ON_CUDA else (5, 1)
COMPILED = [name for name in loss_backends(DEVICE) if name != "reference"]


def _synced(fn):
    if not ON_CUDA:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _time(benchmark, group: str, fn, **info) -> None:
    benchmark.group = group
    benchmark.extra_info.update(info, **environment(DEVICE))
    benchmark.pedantic(_synced(fn), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


@pytest.fixture(scope="module")
def loss_inputs():
    b, dp, d = LOSS_SHAPE
    g = torch.Generator().manual_seed(0)
    p = torch.randn(b, dp, generator=g).to(LOSS_DTYPE).to(DEVICE)
    z = torch.randn(b, d, generator=g).to(LOSS_DTYPE).to(DEVICE).requires_grad_(True)
    t = rk.Transport(torch.randn(dp, generator=g), torch.randn(dp, d, generator=g) / dp**0.5)
    return z, p, t.to(DEVICE)


def _loss_fn(variant: str):
    if variant == "eager":
        return eager_loss
    return lambda z, p, t: rk.transported_cosine_loss(
        z, p, t, reduction="mean", backend=variant, check_finite=False
    )


@pytest.mark.parametrize("variant", ["eager", *COMPILED])
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
def test_transported_cosine_loss(benchmark, loss_inputs, variant, pass_):
    z, p, t = loss_inputs
    loss = _loss_fn(variant)

    def forward():
        with torch.no_grad():
            return loss(z, p, t)

    def forward_backward():
        z.grad = None
        loss(z, p, t).backward()

    b, dp, d = LOSS_SHAPE
    shape = dict(B=b, Dp=dp, d=d, dtype=str(LOSS_DTYPE).replace("torch.", ""))
    fn = forward if pass_ == "forward" else forward_backward
    _time(benchmark, f"loss {pass_} B={b} Dp={dp} d={d}", fn, variant=variant, **shape)


@pytest.fixture(scope="module", params=SELECT_SIZES, ids=lambda n: f"N{n:.0e}")
def scores(request):
    g = torch.Generator().manual_seed(1)
    return torch.randn(request.param, generator=g).to(DEVICE)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("variant", ["torch.topk", "select_topk"])
def test_select_topk(benchmark, scores, fraction, variant):
    n = scores.shape[0]
    k = max(1, int(n * fraction))
    if variant == "torch.topk":
        fn = lambda: torch.topk(scores, k, sorted=False)  # noqa: E731
    else:
        chosen = rk.select_topk(scores, k)
        want = torch.topk(scores, k, sorted=True).values
        assert torch.equal(torch.sort(scores[chosen], descending=True).values, want)
        fn = lambda: rk.select_topk(scores, k)  # noqa: E731
    _time(benchmark, f"select_topk N={n} k/N={fraction}", fn, variant=variant, N=n, k=k)


@pytest.fixture(scope="module")
def score_inputs():
    n, dp, d = SCORE_SHAPE
    g = torch.Generator().manual_seed(2)
    t = rk.Transport(
        torch.randn(dp, generator=g), torch.randn(dp, d, generator=g) / dp**0.5, torch.randn(d)
    )
    z = torch.randn(n, d, generator=g).to(LOSS_DTYPE).to(DEVICE)
    p = torch.randn(n, dp, generator=g).to(LOSS_DTYPE).to(DEVICE)
    return z, p, t.to(DEVICE)


@pytest.mark.parametrize("variant", ["read p once", "eager", *COMPILED])
def test_score_and_select(benchmark, score_inputs, variant):
    z, p, t = score_inputs
    n, dp, d = SCORE_SHAPE
    k = n // 10
    if variant == "read p once":
        fn = lambda: torch.sum(p)  # noqa: E731
    elif variant == "eager":
        fn = lambda: eager_score_and_select(z, p, t, k)  # noqa: E731
    else:
        indices, losses = rk.score_and_select(z, p, t, k, backend=variant)
        assert torch.equal(indices, rk.select_topk(losses, k))
        fn = lambda: rk.score_and_select(z, p, t, k, backend=variant)  # noqa: E731
    with torch.no_grad():
        _time(benchmark, f"score_and_select N={n} Dp={dp} d={d}", fn, variant=variant, k=k)
