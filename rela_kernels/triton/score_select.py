"""``score_and_select`` on the Triton backend: the losses and a radix select's first pass in one
read of ``p``, then an exact finish on the ``B`` losses alone.

Pass 1 (``cosine_loss.transported_cosine_loss_hist``, one kernel): every program computes the
transported cosine loss of its rows, stores them, and, while they are still in registers, maps
each loss to the order-preserving uint32 key of the radix selects (``-0.0`` folded onto
``+0.0``, negatives bit-inverted, positives with the sign bit set; inverted for
``largest=False``, so the task is always "the k largest keys") and adds its top ``HIST_BITS``
(16) bits to one global histogram of ``2**16`` int32 bins with relaxed atomics.

Pass 2 (torch, on ``B`` floats and the ``2**16`` bins): the suffix sums of the histogram give the
bin ``b`` holding the k-th largest key and the number of keys in higher bins. Bin ``b`` is a
closed float interval, so one comparison with its edge selects every row of a higher bin and a
range test finds the rows of bin ``b`` (the candidates, in index order); of those, the
``k - above`` with the largest full keys are taken by a stable descending sort of their keys,
so equal keys go to the lower index. The selected rows are read back in index order (three
host syncs: the bin, the candidates, the result). This is exactly
``reference.select_topk(losses, k, largest)``: keys order like the floats, ``-0.0`` ties
``0.0``, ``±inf`` are ordinary keys. NaN losses (only from non-finite inputs, which
``rk.score_and_select`` then rejects) get keys beyond ``±inf`` instead of raising here.

Bytes of ``p`` read: ``B * Dp * p.element_size()``, once, in pass 1 (plus ``z``: ``B * d *
z.element_size()``). ``p`` is by far the largest input (``Dp`` is the prior's width, 768 and up),
so reading it once is the floor; the selection touches only the losses (``4 * B`` bytes, a few
times) and the histogram, never ``p`` or ``z`` again. The earlier two-kernel path read ``p``
once as well, then ran the device's full radix select over the losses (a histogram pass per key
byte, a count and a write pass); now the first histogram rides along with the loss kernel, one
16-bit digit resolves what two byte passes did, and only one bin's candidates are sorted.
``k = 0`` and ``k = B`` need no histogram: the plain fused loss runs and the answer is known.

Not yet measured on a GPU: losses that all fall into one bin (e.g. all equal) make every row's
atomic hit one address, and the finish's syncs and small launches may matter at small ``B``.
"""

from __future__ import annotations

import math
import struct

import torch
from torch import Tensor

from rela_kernels.triton import cosine_loss as kernels

__all__ = ["order_keys", "score_and_select", "select_from_histogram"]

_KEY_MASK = 0xFFFFFFFF
_SIGN = 0x80000000
# Ascending keys of -inf and +inf: NaN keys lie below the first and above the second.
_NEG_INF_KEY = 0x007FFFFF
_POS_INF_KEY = 0xFF800000


def order_keys(scores: Tensor, largest: bool) -> Tensor:
    """int64 keys in ``[0, 2**32)`` of float32 ``scores``: the kernel's ``_order_key``."""
    bits = scores.contiguous().view(torch.int32).to(torch.int64) & _KEY_MASK
    bits = torch.where(bits == _SIGN, 0, bits)  # -0.0 -> +0.0
    keys = torch.where(bits >= _SIGN, _KEY_MASK - bits, bits | _SIGN)
    return keys if largest else _KEY_MASK - keys


def _key_value(key: int) -> float:
    """The float32 value of an ascending (``largest``) order key, NaN patterns clamped to ±inf."""
    if key == _SIGN - 1:  # the slot of -0.0, which is keyed as +0.0: the next key down
        key -= 1
    bits = key & ~_SIGN if key >= _SIGN else _KEY_MASK - key
    value = struct.unpack("<f", struct.pack("<I", bits))[0]
    if math.isnan(value):
        return math.inf if key >= _SIGN else -math.inf
    return value


def _has_nan(scores: Tensor) -> bool:
    return bool(torch.isnan(scores).any())


def _bin_range(bin_index: int, largest: bool, hist_bits: int) -> tuple[float, float, bool]:
    """The closed float interval whose non-NaN scores have keys in bin ``bin_index``, and
    whether the bin also holds NaN keys (then an edge was clamped to ±inf)."""
    if not largest:  # keys were inverted: the same bin counted on ascending keys
        bin_index = 2**hist_bits - 1 - bin_index
    shift = 32 - hist_bits
    low_key, high_key = bin_index << shift, ((bin_index + 1) << shift) - 1
    holds_nan = low_key < _NEG_INF_KEY or high_key > _POS_INF_KEY
    return _key_value(low_key), _key_value(high_key), holds_nan


def select_from_histogram(
    scores: Tensor, hist: Tensor, k: int, largest: bool, hist_bits: int = kernels.HIST_BITS
) -> Tensor:
    """int64 ``[k]``: ``reference.select_topk(scores, k, largest)`` for float32 ``scores``, given
    ``hist``, the counts of their keys' top ``hist_bits`` bits (``order_keys(...) >> (32 -
    hist_bits)``). Reads only ``scores`` and ``hist``.

    Rows beyond the winning bin are found by one float comparison with the bin's edge (key
    order is float order), the bin's rows by a range test; only those candidates get keys.
    """
    n = scores.shape[0]
    assert scores.dtype == torch.float32 and scores.dim() == 1 and 0 <= k <= n
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    if k == n:
        return torch.arange(n, dtype=torch.int64, device=scores.device)
    counts = hist.to(torch.int64)
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # keys in bins >= b
    above = at_or_above - counts  # keys in bins > b
    # Exactly one bin satisfies above < k <= at_or_above, as 1 <= k <= n = sum of the counts.
    winner = ((above < k) & (k <= at_or_above)).to(torch.int32).argmax()
    bin_index, above_bin, in_bin = torch.stack((winner, above[winner], counts[winner])).tolist()
    low, high, holds_nan = _bin_range(bin_index, largest, hist_bits)
    chosen = scores > high if largest else scores < low
    candidates = ((scores >= low) & (scores <= high)).nonzero().squeeze(1)
    in_range, need = candidates.numel(), k - above_bin
    if in_range == in_bin and need < in_bin:
        # Stable: among equal keys the earlier candidate, i.e. the lower index, comes first.
        keys = order_keys(scores[candidates], largest)
        candidates = candidates[torch.sort(keys, descending=True, stable=True).indices[:need]]
    chosen[candidates] = True
    indices = chosen.nonzero().squeeze(1)
    # NaN has a key but fails every comparison. A non-NaN score is beyond the bin, in it or
    # short of it; when both counts are right, no NaN is beyond the bin, and none is in it
    # unless the bin holds NaN keys (the ±inf bins only: then look).
    if in_range == in_bin and indices.numel() == k and not (holds_nan and _has_nan(scores)):
        return indices
    # Only non-finite inputs give NaN losses, and rk.score_and_select rejects those after this
    # returns: answer in key order meanwhile.
    if _has_nan(scores):
        order = torch.sort(order_keys(scores, largest), descending=True, stable=True).indices
        return torch.sort(order[:k]).values
    raise RuntimeError(
        f"rela triton: the histogram does not match the scores (bin {bin_index} counts "
        f"{in_bin} keys, {in_range} scores lie in its range)"
    )


def score_and_select(
    z: Tensor,
    p: Tensor,
    mean: Tensor,
    matrix: Tensor,
    bias: Tensor | None,
    eps: float,
    k: int,
    largest: bool,
) -> tuple[Tensor, Tensor]:
    """``(indices[k], losses[B])``, ``p`` read once; same contract as ``rk.score_and_select``."""
    batch = z.shape[0]
    assert 0 <= k <= batch
    if k in (0, batch):
        losses, _ = kernels.transported_cosine_loss_fwd(z, p, mean, matrix, bias, eps, False)
        return select_from_histogram(losses, losses.new_empty(0), k, largest), losses
    losses, hist = kernels.transported_cosine_loss_hist(z, p, mean, matrix, bias, eps, largest)
    return select_from_histogram(losses, hist, k, largest), losses
