"""Inputs on two devices: a one-line error that names both, checked on CPU with the meta device
standing in for a second device (tests/test_cuda_ops.py checks the same with CUDA tensors)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_transport

import rela_kernels as rk


def test_loss_ops_name_both_devices(generator):
    z = torch.randn(4, 3, generator=generator)
    meta = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="^rk.cosine_loss: y is on meta but z is on cpu; all"):
        rk.cosine_loss(z, meta)
    with pytest.raises(ValueError, match="weight is on meta but the inputs are on cpu$"):
        rk.cosine_loss(z, z.clone(), weight=torch.ones(4, device="meta"))
    t = make_transport(5, 3, generator)
    with pytest.raises(ValueError, match="p is on meta but z is on cpu"):
        rk.score_and_select(z, torch.empty(4, 5, device="meta"), t, 1)


def test_fit_chunks_on_two_devices(generator):
    chunks = [torch.randn(8, 3, generator=generator), torch.empty(8, 3, device="meta")]
    with pytest.raises(
        ValueError, match="embeddings chunk 1 is on meta but chunk 0 is on cpu; pass device="
    ):
        rk.fit_pca_whitening(chunks, 2)
