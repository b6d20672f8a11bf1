"""Property-based tests (hypothesis): ``select_topk`` against a sorting oracle, and the ops'
argument checks, on every backend usable on CPU.

* select_topk: random sizes (0 and 1 included), heavy ties, signed zeros, +-inf, every score
  dtype, largest and smallest: the indices are exactly those of a stable sort (ties to the lower
  index), ascending; NaN is refused; the scores are never modified.
* Argument checks: one argument of an otherwise valid call is made wrong (shape, dtype, device,
  type, k, eps, reduction, weight); the call raises ValueError or TypeError whose message names
  that argument, and no input is modified.

Examples are few (CI time) and there is no per-example deadline (the Triton interpreter is slow).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import usable_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rela_kernels as rk

BACKENDS = usable_backends()
SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Values with many ties after rounding to 16 bits, signed zeros and infinities.
SCORE_VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, float("inf"), float("-inf"), 1e-3, 65504.0]),
    st.floats(min_value=-4.0, max_value=4.0, allow_nan=False, width=32),
)


def _oracle(scores: torch.Tensor, k: int, largest: bool) -> list[int]:
    """The contract, by a plain Python sort: highest (lowest) values first, ties to the lower
    index; the k chosen indices in ascending order. ``-0.0 == 0.0`` in Python too."""
    values = scores.double().tolist()
    key = (lambda i: (-values[i], i)) if largest else (lambda i: (values[i], i))
    return sorted(sorted(range(len(values)), key=key)[:k])


@st.composite
def select_case(draw: st.DrawFn) -> tuple[torch.Tensor, int, bool]:
    n = draw(st.integers(min_value=0, max_value=48))
    dtype = draw(st.sampled_from(SCORE_DTYPES))
    values = draw(st.lists(SCORE_VALUES, min_size=n, max_size=n))
    scores = torch.tensor(values, dtype=torch.float32).to(dtype)
    if draw(st.booleans()) and n > 1:  # a strided view: every other element of a buffer
        wide = torch.zeros(2 * n, dtype=dtype)
        wide[::2] = scores
        scores = wide[::2]
    k = draw(st.integers(min_value=0, max_value=n))
    return scores, k, draw(st.booleans())


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=select_case())
def test_select_topk_matches_a_sorting_oracle(backend: str, case) -> None:
    scores, k, largest = case
    before = scores.clone()
    chosen = rk.select_topk(scores, k, largest=largest, backend=backend)
    assert chosen.dtype == torch.int64 and chosen.shape == (k,)
    assert chosen.tolist() == _oracle(scores, k, largest)
    assert torch.equal(scores, before) and scores.dtype == before.dtype


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=select_case(), data=st.data())
def test_select_topk_refuses_nan(backend: str, case, data: st.DataObject) -> None:
    scores, k, largest = case
    if scores.shape[0] == 0:
        scores = torch.zeros(1, dtype=scores.dtype)
    scores = scores.clone()
    where = data.draw(st.integers(min_value=0, max_value=scores.shape[0] - 1))
    scores[where] = float("nan")
    before = scores.clone()
    with pytest.raises(ValueError, match="scores must not contain NaN"):
        rk.select_topk(scores, min(k, scores.shape[0]), largest=largest, backend=backend)
    assert torch.equal(scores.isnan(), before.isnan())
    assert torch.equal(scores.nan_to_num(), before.nan_to_num())


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------

BAD_DTYPES = (torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8)


def _raises_naming(name: str, call) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert re.search(rf"\b{name}\b", str(info.value)), f"{name!r} not in: {info.value}"


def _snapshot(*values: object) -> list[torch.Tensor]:
    return [v.clone() for v in values if isinstance(v, torch.Tensor) and v.device.type != "meta"]


def _unchanged(before: list[torch.Tensor], *values: object) -> None:
    after = [v for v in values if isinstance(v, torch.Tensor) and v.device.type != "meta"]
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert new.dtype == old.dtype and torch.equal(new, old)


@st.composite
def select_arguments(draw: st.DrawFn) -> tuple[str, object, object, object]:
    """``(bad argument, scores, k, largest)`` with exactly one argument wrong."""
    n = draw(st.integers(min_value=0, max_value=16))
    scores: object = torch.randn(n)
    k: object = draw(st.integers(min_value=0, max_value=n))
    largest: object = draw(st.booleans())
    bad = draw(st.sampled_from(["scores", "k", "largest"]))
    if bad == "scores":
        scores = draw(
            st.sampled_from(
                [
                    torch.randn(n, 2),  # 2-D
                    torch.tensor(1.0),  # 0-D
                    torch.randn(n).to(draw(st.sampled_from(BAD_DTYPES))),
                    torch.randn(n).tolist(),  # not a tensor
                    None,
                ]
            )
        )
        k = min(k, 1)  # k is valid for any 1-D input of at least one element, or 0
        if isinstance(scores, torch.Tensor) and scores.dim() == 0:
            k = 0
    elif bad == "k":
        k = draw(
            st.one_of(
                st.integers(max_value=-1),
                st.integers(min_value=n + 1),
                st.sampled_from([0.5, float(n), True, None, "1", torch.tensor(0)]),
            )
        )
    else:
        largest = draw(st.sampled_from([1, 0, None, "yes", torch.tensor(True)]))
    return bad, scores, k, largest


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=select_arguments())
def test_select_topk_argument_checks(backend: str, case) -> None:
    bad, scores, k, largest = case
    before = _snapshot(scores)
    _raises_naming(
        bad,
        lambda: rk.select_topk(scores, k, largest=largest, backend=backend),  # type: ignore[arg-type]
    )
    _unchanged(before, scores)


def _transport(dp: int, d: int, bias: bool) -> rk.Transport:
    return rk.Transport(torch.randn(dp), torch.randn(dp, d), torch.randn(d) if bias else None)


LOSS_BAD = (
    "z_ndim", "z_dtype", "z_type", "z_rows", "z_width", "z_device",
    "p_ndim", "p_dtype", "p_width", "p_empty", "p_device",
    "t_type", "weight_len", "weight_dtype", "weight_ndim", "weight_device",
    "eps_value", "eps_type", "reduction", "k_range", "k_type", "largest",
)  # fmt: skip


@st.composite
def transported_arguments(draw: st.DrawFn) -> tuple[str, str, dict]:
    """``(op, bad argument name, kwargs)`` for transported_cosine_loss or score_and_select with
    exactly one argument wrong."""
    op = draw(st.sampled_from(["transported_cosine_loss", "score_and_select"]))
    b = draw(st.integers(min_value=1, max_value=8))
    d = draw(st.integers(min_value=1, max_value=6))
    dp = draw(st.integers(min_value=1, max_value=6))
    dtype = draw(st.sampled_from(SCORE_DTYPES))
    args = {
        "z": torch.randn(b, d).to(dtype),
        "p": torch.randn(b, dp).to(dtype),
        "t": _transport(dp, d, draw(st.booleans())),
    }
    if op == "score_and_select":
        args["k"] = draw(st.integers(min_value=0, max_value=b))
        choices = [c for c in LOSS_BAD if not c.startswith(("weight", "reduction"))]
    else:
        args["weight"] = torch.rand(b)
        choices = [c for c in LOSS_BAD if not c.startswith(("k_", "largest"))]
    bad = draw(st.sampled_from(choices))
    z, p = args["z"], args["p"]
    changes = {
        "z_ndim": ("z", z.reshape(-1)),
        "z_dtype": ("z", z.to(draw(st.sampled_from(BAD_DTYPES)))),
        "z_type": ("z", z.tolist()),
        "z_rows": ("z", torch.randn(b + draw(st.integers(1, 3)), d).to(dtype)),
        "z_width": ("z", torch.randn(b, d + draw(st.integers(1, 3))).to(dtype)),
        "z_device": ("z", torch.empty(b, d, dtype=dtype, device="meta")),
        "p_ndim": ("p", p.reshape(1, b, dp)),
        "p_dtype": ("p", p.to(draw(st.sampled_from(BAD_DTYPES)))),
        "p_width": ("p", torch.randn(b, dp + draw(st.integers(1, 3))).to(dtype)),
        "p_empty": ("p", torch.randn(0, dp).to(dtype)),
        "p_device": ("p", torch.empty(b, dp, dtype=dtype, device="meta")),
        "t_type": ("t", draw(st.sampled_from([None, "transport", torch.randn(dp, d)]))),
        "weight_len": ("weight", torch.rand(b + draw(st.integers(1, 3)))),
        "weight_dtype": ("weight", torch.ones(b, dtype=torch.int64)),
        "weight_ndim": ("weight", torch.rand(b, 1)),
        "weight_device": ("weight", torch.empty(b, device="meta")),
        "eps_value": ("eps", draw(st.sampled_from([0.0, -1e-8, float("nan"), float("inf")]))),
        "eps_type": ("eps", draw(st.sampled_from([None, "1e-8", True]))),
        "reduction": ("reduction", draw(st.sampled_from(["avg", "", None, "MEAN"]))),
        "k_range": ("k", draw(st.sampled_from([-1, b + 1, b + 100]))),
        "k_type": ("k", draw(st.sampled_from([1.0, None, True, "2"]))),
        "largest": ("largest", draw(st.sampled_from([1, None, "no"]))),
    }
    name, value = changes[bad]
    args[name] = value
    return op, name, args


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=transported_arguments())
def test_transported_ops_argument_checks(backend: str, case) -> None:
    op, name, args = case
    before = _snapshot(*args.values())
    function = getattr(rk, op)
    positional = [args.pop(key) for key in ("z", "p", "t")]
    if op == "score_and_select":
        positional.append(args.pop("k"))
    _raises_naming(name, lambda: function(*positional, backend=backend, **args))
    _unchanged(before, *positional, *args.values())


@st.composite
def cosine_arguments(draw: st.DrawFn) -> tuple[str, dict]:
    b = draw(st.integers(min_value=1, max_value=8))
    d = draw(st.integers(min_value=1, max_value=6))
    dtype = draw(st.sampled_from(SCORE_DTYPES))
    args = {"z": torch.randn(b, d).to(dtype), "y": torch.randn(b, d).to(dtype)}
    bad = draw(st.sampled_from(["z", "y", "y_shape", "y_device", "weight", "eps", "reduction"]))
    if bad == "z":
        args["z"] = draw(
            st.sampled_from(
                [args["z"].reshape(-1), args["z"].double(), torch.randn(b, 0), args["z"].tolist()]
            )
        )
    elif bad == "y":
        args["y"] = draw(st.sampled_from([args["y"].reshape(-1), args["y"].long(), None]))
    elif bad == "y_shape":
        args["y"] = torch.randn(b + 1, d).to(dtype)
        bad = "y"
    elif bad == "y_device":
        args["y"] = torch.empty(b, d, dtype=dtype, device="meta")
        bad = "y"
    elif bad == "weight":
        args["weight"] = draw(
            st.sampled_from([torch.rand(b + 1), torch.ones(b, dtype=torch.int32), torch.rand(1, b)])
        )
    elif bad == "eps":
        args["eps"] = draw(st.sampled_from([0.0, -1.0, float("nan"), None, "tiny"]))
    else:
        args["reduction"] = draw(st.sampled_from(["avg", None, "Sum"]))
    return bad, args


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=cosine_arguments())
def test_cosine_loss_argument_checks(backend: str, case) -> None:
    name, args = case
    before = _snapshot(*args.values())
    z, y = args.pop("z"), args.pop("y")
    _raises_naming(name, lambda: rk.cosine_loss(z, y, backend=backend, **args))
    _unchanged(before, z, y, *args.values())


@st.composite
def transport_arguments(draw: st.DrawFn) -> tuple[str, object, object]:
    b = draw(st.integers(min_value=1, max_value=8))
    dp = draw(st.integers(min_value=1, max_value=6))
    d = draw(st.integers(min_value=1, max_value=6))
    p: object = torch.randn(b, dp)
    t: object = _transport(dp, d, draw(st.booleans()))
    bad = draw(st.sampled_from(["p", "t"]))
    if bad == "p":
        p = draw(
            st.sampled_from(
                [
                    torch.randn(b, dp + 1),
                    torch.randn(dp),
                    torch.randn(b, dp).double(),
                    torch.zeros(0, dp),
                    torch.randn(b, dp).tolist(),
                ]
            )
        )
    else:
        t = draw(st.sampled_from([None, torch.randn(dp, d), {"mean": torch.zeros(dp)}]))
    return bad, p, t


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=transport_arguments())
def test_transport_argument_checks(backend: str, case) -> None:
    name, p, t = case
    before = _snapshot(p)
    _raises_naming(name, lambda: rk.transport(p, t, backend=backend))  # type: ignore[arg-type]
    _unchanged(before, p)
