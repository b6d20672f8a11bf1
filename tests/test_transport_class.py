"""rk.Transport: validation, copies, device moves, state dicts and atomic save/load."""

from __future__ import annotations

import pytest
import torch

import rela_kernels as rk


def _transport(g: torch.Generator, bias: bool = True) -> rk.Transport:
    return rk.Transport(
        torch.randn(6, generator=g),
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        torch.randn(4, generator=g) if bias else None,
    )


def test_stores_float32_copies(generator):
    mean = torch.randn(6, generator=generator, dtype=torch.float16)
    matrix = torch.randn(6, 4, generator=generator).t().contiguous().t()  # non-contiguous
    t = rk.Transport(mean, matrix)
    assert t.mean.dtype == t.matrix.dtype == torch.float32
    assert t.matrix.is_contiguous() and (t.in_dim, t.out_dim) == (6, 4) and t.bias is None
    matrix.mul_(2)  # later changes to the argument do not reach the transport
    assert torch.equal(t.matrix * 2, matrix)


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((torch.zeros(6, 1), torch.zeros(6, 4)), ValueError, "mean must be 1-D"),
        ((torch.zeros(6), torch.zeros(6)), ValueError, "matrix must be 2-D"),
        ((torch.zeros(5), torch.zeros(6, 4)), ValueError, r"matrix must be \[5, d\]"),
        ((torch.zeros(6), torch.zeros(6, 4), torch.zeros(3)), ValueError, r"bias must be \[4\]"),
        ((torch.zeros(6, dtype=torch.long), torch.zeros(6, 4)), TypeError, "mean must be floating"),
        (("mean", torch.zeros(6, 4)), TypeError, "mean must be a torch.Tensor"),
        ((torch.zeros(0), torch.zeros(0, 4)), ValueError, "matrix must be non-empty"),
        ((torch.zeros(6), torch.full((6, 4), float("nan"))), ValueError, "matrix must be finite"),
        ((torch.tensor([1.0, float("inf")]), torch.zeros(2, 1)), ValueError, "mean must be finite"),
    ],
)
def test_rejects_bad_parameters(args, error, message):
    with pytest.raises(error, match=message):
        rk.Transport(*args)


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(bias, generator):
    t = _transport(generator, bias)
    other = _transport(generator, not bias)
    other.load_state_dict(t.state_dict())
    for key, value in t.state_dict().items():
        got = other.state_dict()[key]
        assert (value is None and got is None) or torch.equal(value, got)


def test_load_state_dict_is_validated_and_atomic(generator):
    t = _transport(generator)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    with pytest.raises(ValueError, match="missing"):
        t.load_state_dict({"mean": torch.zeros(6)})
    with pytest.raises(ValueError, match=r"bias must be \[4\]"):
        t.load_state_dict(
            {"mean": torch.zeros(6), "matrix": torch.zeros(6, 4), "bias": torch.zeros(2)}
        )
    for key, value in t.state_dict().items():
        assert torch.equal(value, before[key])


def test_save_load(tmp_path, generator):
    t = _transport(generator)
    path = tmp_path / "sub" / "transport.pt"
    t.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["transport.pt"]  # no temporaries left
    loaded = rk.Transport.load(path)
    p = torch.randn(3, 6, generator=generator)
    torch.testing.assert_close(rk.transport(p, loaded), rk.transport(p, t), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no transport file"):
        rk.Transport.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a saved Transport"):
        rk.Transport.load(tmp_path / "junk.pt")


def test_to_and_call(generator):
    t = _transport(generator)
    assert t.to("cpu") is t
    meta = t.to("meta")
    assert meta.device.type == "meta" and meta.matrix.shape == t.matrix.shape
    p = torch.randn(2, 6, generator=generator)
    torch.testing.assert_close(t(p), rk.reference.transport(p, t.mean, t.matrix, t.bias))
    assert "in_dim=6" in repr(t)
