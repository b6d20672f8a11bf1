"""Data selection: per-sample scores, the epoch subset sampler, in-batch and streaming top-k.

Everything here is trainer-agnostic and works from any training loop:

* :class:`ScoreTable` holds one float32 score (typically the latest loss) per training sample.
  Updates are all-gathered across ranks when ``torch.distributed`` is initialized, so every rank
  holds the same table.
* :class:`SubsetSampler` picks each epoch's ``max(1, floor(budget * n))`` samples by a policy
  (``random``, ``hard``, ``easy``, ``infobatch``), shuffles, pads and shards them like
  ``torch.utils.data.DistributedSampler``. Given identical tables, every rank picks the same subset.
* :func:`select_in_batch` picks the rows of a (no-grad scored) batch to back-propagate.
* :class:`StreamingTopK` is :func:`rela_kernels.select_topk` over score sets fed in chunks, for
  sets larger than memory.

All selections follow :func:`rela_kernels.select_topk`'s contract: ties are won by the lower
index, results come back in ascending index order.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from rela_kernels._validation import (
    SCORE_DTYPES,
    check_anneal,
    check_fraction,
    check_int,
    check_largest,
    check_no_nan,
    check_tensor,
)
from rela_kernels.ops import select_topk

__all__ = [
    "POLICIES",
    "ScoreTable",
    "StreamingTopK",
    "SubsetSampler",
    "select_in_batch",
    "subset_size",
]

POLICIES = ("random", "hard", "easy", "infobatch")


# --------------------------------------------------------------------------------------------
# Small argument helpers
# --------------------------------------------------------------------------------------------


def subset_size(n: int, fraction: float) -> int:
    """``max(1, floor(fraction * n))``, the number of samples a budget (or keep fraction) keeps.

    The product is rounded to 6 decimals before the floor so that binary rounding of the fraction
    does not lose a sample (``0.29 * 100`` is 28.999999999999996 in floating point, but 29 here).
    """
    return max(1, math.floor(round(fraction * n, 6)))


def _distributed(group: object | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


# --------------------------------------------------------------------------------------------
# Score table
# --------------------------------------------------------------------------------------------


class ScoreTable:
    """Per-sample float32 scores, identical on every rank.

    Args:
        n: number of training samples.
        device: where the table lives (the sampler reads it once per epoch; updates are moved
            here).
        init: initial score of every sample. The default 2.0 is the largest possible cosine
            loss, so samples never scored look hardest to ``hard`` and ``infobatch``.
        group: process group for the all-gather (default: the world), when distributed.

    :meth:`update` writes scores. When ``torch.distributed`` is initialized with more than one
    rank, every rank must call it the same number of times (it is a collective); each call first
    all-gathers the ``(indices, scores)`` of every rank (the sizes may differ per rank), so all
    tables receive the same writes in the same order.
    """

    def __init__(
        self,
        n: int,
        device: torch.device | str = "cpu",
        init: float = 2.0,
        *,
        group: object | None = None,
    ) -> None:
        where = "rk.ScoreTable"
        n = check_int(where, "n", n, 1)
        if isinstance(init, bool) or not isinstance(init, numbers.Real):
            raise TypeError(f"{where}: init must be a float, got {type(init).__name__}")
        if math.isnan(init):
            raise ValueError(f"{where}: init must not be NaN, got {init}")
        self.init = float(init)
        self._scores = torch.full((n,), self.init, dtype=torch.float32, device=device)
        self.group = group

    @property
    def n(self) -> int:
        return self._scores.shape[0]

    def __len__(self) -> int:
        return self.n

    @property
    def device(self) -> torch.device:
        return self._scores.device

    @property
    def scores(self) -> torch.Tensor:
        """The float32 ``[n]`` table itself (no copy): read it, write through :meth:`update`."""
        return self._scores

    def reset(self) -> None:
        """Every score back to ``init``, as when the table was made (a local operation: call it
        at the same point on every rank, e.g. when the training objective changes)."""
        self._scores.fill_(self.init)

    def _check_update(self, indices: object, scores: object) -> tuple[torch.Tensor, torch.Tensor]:
        where = "rk.ScoreTable.update"
        indices = check_tensor(where, "indices", indices, ndim=1, shape_hint="[m]")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"{where}: indices must be an integer tensor, got {indices.dtype}")
        scores = check_tensor(where, "scores", scores, ndim=1, shape_hint="[m]", floating=True)
        if scores.shape[0] != indices.shape[0]:
            raise ValueError(
                f"{where}: scores must have one entry per index ({indices.shape[0]}), "
                f"got {scores.shape[0]}"
            )
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.n:
                bad = low if low < 0 else high
                raise ValueError(
                    f"{where}: indices must be in [0, {self.n}) (the table size), got {bad}"
                )
        check_no_nan(where, "scores", scores)
        return indices.detach().to(torch.int64), scores.detach().to(torch.float32)

    def _gather(
        self, indices: torch.Tensor | None, scores: torch.Tensor | None, error: Exception | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' updates, concatenated in rank order.

        The first collective exchanges sizes, with -1 for a rank whose input was rejected: then
        every rank raises instead of the valid ones blocking forever in the next collective.
        """
        group = self.group
        comm = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )
        world = dist.get_world_size(group)
        mine = -1 if error is not None else indices.shape[0]
        size = torch.tensor([mine], dtype=torch.int64, device=comm)
        sizes_t = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes_t, size, group=group)
        sizes = [int(s) for s in sizes_t]
        if error is not None:
            raise error
        bad = [r for r, s in enumerate(sizes) if s < 0]
        if bad:
            raise ValueError(
                f"rk.ScoreTable.update: rank(s) {bad} passed invalid indices/scores; "
                "no table was modified"
            )
        longest = max(sizes)
        padded_i = torch.zeros(longest, dtype=torch.int64, device=comm)
        padded_s = torch.zeros(longest, dtype=torch.float32, device=comm)
        padded_i[: indices.shape[0]] = indices
        padded_s[: scores.shape[0]] = scores
        all_i = [torch.empty_like(padded_i) for _ in range(world)]
        all_s = [torch.empty_like(padded_s) for _ in range(world)]
        dist.all_gather(all_i, padded_i, group=group)
        dist.all_gather(all_s, padded_s, group=group)
        return (
            torch.cat([t[:m] for t, m in zip(all_i, sizes, strict=True)]),
            torch.cat([t[:m] for t, m in zip(all_s, sizes, strict=True)]),
        )

    def update(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Write ``scores[j]`` to sample ``indices[j]`` (all ranks' writes when distributed).

        ``indices``: 1-D integer tensor in ``[0, n)``; ``scores``: 1-D floating tensor of the same
        length, no NaN (any device; stored as float32). When an index appears more than once, the
        last write wins (in rank order, then position), identically on every rank. Invalid input
        raises ValueError/TypeError on every rank and modifies no table.
        """
        error: Exception | None = None
        checked: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        try:
            checked = self._check_update(indices, scores)
        except (TypeError, ValueError) as caught:
            error = caught
        if _distributed(self.group):
            idx, val = self._gather(checked[0], checked[1], error)
        elif error is not None:
            raise error
        else:
            idx, val = checked
        idx, val = idx.to(self.device), val.to(self.device)
        # Index assignment with duplicate indices leaves the winner unspecified; keep only the
        # last occurrence of each index (a stable sort keeps equal indices in write order).
        sorted_idx, order = torch.sort(idx, stable=True)
        last = torch.ones_like(sorted_idx, dtype=torch.bool)
        last[:-1] = sorted_idx[1:] != sorted_idx[:-1]
        self._scores[sorted_idx[last]] = val[order[last]]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"scores": float32 [n] CPU copy}``, for checkpoints."""
        return {"scores": self._scores.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s output (validated first; on error nothing changes)."""
        where = "rk.ScoreTable.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: state must be a mapping, got {type(state).__name__}")
        if set(state) != {"scores"}:
            raise ValueError(f"{where}: expected the single key 'scores', got {sorted(state)}")
        scores = check_tensor(where, "scores", state["scores"], ndim=1, shape_hint=f"[{self.n}]")
        if not scores.is_floating_point():
            raise TypeError(f"{where}: scores must be floating point, got {scores.dtype}")
        if scores.shape[0] != self.n:
            raise ValueError(
                f"{where}: scores must have {self.n} entries (the table size), "
                f"got {scores.shape[0]}"
            )
        check_no_nan(where, "scores", scores)
        self._scores.copy_(scores)

    def __repr__(self) -> str:
        return f"ScoreTable(n={self.n}, device={self.device})"


# --------------------------------------------------------------------------------------------
# Subset sampler
# --------------------------------------------------------------------------------------------


def _exact_mean(values: torch.Tensor) -> float:
    """Mean of a float32 CPU vector, independent of thread count (so equal on every rank).

    Row sums of a fixed [rows, 4096] layout are each computed by one thread in a fixed order;
    math.fsum of the row sums is exactly rounded, hence order-independent.
    """
    width = 4096
    padded = torch.zeros(math.ceil(values.shape[0] / width) * width, dtype=torch.float64)
    padded[: values.shape[0]] = values
    return math.fsum(padded.view(-1, width).sum(dim=1).tolist()) / values.shape[0]


class SubsetSampler(Sampler[int]):
    """Each epoch, a subset of ``max(1, floor(budget * n))`` samples chosen by a policy.

    Args:
        n: dataset size (the sampler yields indices in ``[0, n)``).
        budget: fraction of the dataset per epoch, in (0, 1].
        policy: ``random`` (the paper: uniform without replacement), ``hard`` (the highest
            scores, via :func:`rela_kernels.select_topk`), ``easy`` (the lowest scores) or
            ``infobatch`` (see below).
        score_table: a :class:`ScoreTable` of size ``n``; required by every policy but
            ``random``. It is read once, in :meth:`set_epoch`.
        seed: base seed; epoch ``e`` uses a CPU generator seeded ``seed + e`` for the random
            draws of the policy and then for the shuffle.
        num_replicas, rank: sharding; default to the world size and rank of the initialized
            default process group, else 1 and 0.
        anneal: InfoBatch's annealing, a fraction in [0, 1): the last
            ``floor(anneal * epochs)`` epochs (:attr:`annealed_epochs`) take every sample, in a
            random order, with weight 1, whatever the policy and budget. 0 (the default): none.
        epochs: the run's number of epochs; required when ``anneal > 0``.

    Per epoch (:meth:`set_epoch`): pick the subset (ascending indices), shuffle it, pad it by
    repeating from its start to a multiple of ``num_replicas``, and give rank ``r`` the positions
    ``r, r + num_replicas, ...`` (as ``DistributedSampler`` does). With identical score tables
    every rank computes the same subset, so the shards are disjoint apart from the padding.
    ``len(sampler)`` is the per-rank count. Iterating before any :meth:`set_epoch` uses epoch 0.

    ``infobatch`` (after InfoBatch, Qin et al., ICLR 2024): samples scoring at least the mean
    score are "high", the rest "low". With ``m`` the budget count, ``H`` high and ``L`` low
    samples: if ``m >= H`` all high samples are kept plus ``m - H`` low samples drawn uniformly,
    and each kept low sample's loss multiplier is ``L / (m - H)`` (the inverse of the kept share,
    i.e. ``1 / (1 - r)`` for pruned fraction ``r``); if ``m < H``, ``m`` high samples are drawn
    uniformly and every multiplier is 1 (a uniform multiplier would only rescale the learning
    rate). :attr:`weights` (``[n]``, 1 except for kept low samples) or :meth:`weight_of` give the
    multipliers; the dataset must return sample indices for a training loop to look them up.

    ``hard``/``easy`` on a fresh table (all scores equal) take the lowest indices, by the
    tie rule; start with ``random`` until the table holds real scores.

    Annealing (``anneal``; InfoBatch anneals the last 12.5% of the epochs): epoch ``e`` is
    annealed when ``e >= epochs - floor(anneal * epochs)``; it yields all ``n`` samples, so
    ``len(sampler)`` and :meth:`epoch_size` grow for that epoch. InfoBatch's own code anneals the
    epochs ``e > (1 - anneal) * epochs``, one fewer when ``anneal * epochs`` is a whole number.
    """

    def __init__(
        self,
        n: int,
        budget: float,
        policy: str = "random",
        *,
        score_table: ScoreTable | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        anneal: float = 0.0,
        epochs: int | None = None,
    ) -> None:
        super().__init__()
        where = "rk.SubsetSampler"
        self.anneal, self.epochs = check_anneal(where, anneal, epochs)
        self.annealed_epochs = (
            math.floor(round(self.anneal * self.epochs, 6)) if self.epochs is not None else 0
        )
        self.n = check_int(where, "n", n, 1)
        self.budget = check_fraction(where, "budget", budget)
        if not isinstance(policy, str) or policy not in POLICIES:
            raise ValueError(
                f"{where}: policy must be one of {', '.join(POLICIES)}; got {policy!r}"
            )
        self.policy = policy
        if score_table is not None and not isinstance(score_table, ScoreTable):
            raise TypeError(
                f"{where}: score_table must be an rk.ScoreTable, got {type(score_table).__name__}"
            )
        if score_table is None and policy != "random":
            raise ValueError(f"{where}: policy {policy!r} needs a score_table, got None")
        if score_table is not None and score_table.n != self.n:
            raise ValueError(
                f"{where}: score_table must have n={self.n} entries (the dataset size), "
                f"got {score_table.n}"
            )
        self.score_table = score_table
        self.seed = check_int(where, "seed", seed, 0, 2**62)
        group_up = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if group_up else 1
        self.num_replicas = check_int(where, "num_replicas", num_replicas, 1)
        if rank is None:
            rank = dist.get_rank() if group_up else 0
        self.rank = check_int(where, "rank", rank, 0, self.num_replicas - 1)
        self.subset_size = subset_size(self.n, self.budget)
        self.num_samples = math.ceil(self.subset_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self._epoch: int | None = None
        self._order = torch.empty(0, dtype=torch.int64)
        self._weights = torch.ones(self.n, dtype=torch.float32)

    # -- selection ------------------------------------------------------------------------

    def _pick(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(subset ascending, weights [n]) for the current table, drawing from ``g``."""
        m = self.subset_size
        weights = torch.ones(self.n, dtype=torch.float32)
        if self.policy == "random":
            return torch.randperm(self.n, generator=g)[:m].sort().values, weights
        # The selection runs on a CPU copy: the same kernel and arithmetic on every rank,
        # whatever device each rank's table is on.
        scores = self.score_table.scores.detach().to("cpu", torch.float32)
        if self.policy in ("hard", "easy"):
            return select_topk(scores, m, largest=self.policy == "hard"), weights
        mean = _exact_mean(scores)
        # +inf and -inf in one table make the mean NaN: then every sample counts as high.
        is_high = (
            scores.double() >= mean if not math.isnan(mean) else torch.ones_like(scores).bool()
        )
        high = torch.nonzero(is_high).flatten()
        low = torch.nonzero(~is_high).flatten()
        if m <= high.shape[0]:
            kept = high[torch.randperm(high.shape[0], generator=g)[:m]]
            return kept.sort().values, weights
        extra = m - high.shape[0]
        kept_low = low[torch.randperm(low.shape[0], generator=g)[:extra]]
        weights[kept_low] = low.shape[0] / extra
        return torch.cat([high, kept_low]).sort().values, weights

    def is_annealed(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` takes the full data with weight 1 (see ``anneal``)."""
        return self.annealed_epochs > 0 and epoch >= self.epochs - self.annealed_epochs

    def epoch_size(self, epoch: int) -> int:
        """Samples of epoch ``epoch`` over all ranks (before padding): ``n`` when annealed,
        else :attr:`subset_size`."""
        return self.n if self.is_annealed(epoch) else self.subset_size

    def _set_length(self, size: int) -> None:
        self.num_samples = math.ceil(size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Pick, shuffle and shard epoch ``epoch``'s subset (reads the score table now)."""
        epoch = check_int("rk.SubsetSampler.set_epoch", "epoch", epoch, 0, 2**62)
        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.is_annealed(epoch):
            subset, weights = torch.arange(self.n), torch.ones(self.n, dtype=torch.float32)
        else:
            subset, weights = self._pick(g)
        self._order = subset[torch.randperm(subset.shape[0], generator=g)]
        self._weights = weights
        self._epoch = epoch
        self._set_length(subset.shape[0])

    def _ensure_epoch(self) -> None:
        if self._epoch is None:
            self.set_epoch(0)

    # -- results --------------------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        """The epoch of the current subset (None before the first :meth:`set_epoch`)."""
        return self._epoch

    @property
    def subset(self) -> torch.Tensor:
        """The current epoch's subset, int64 ascending, ``[epoch_size(epoch)]`` (all ranks)."""
        self._ensure_epoch()
        return self._order.sort().values

    @property
    def weights(self) -> torch.Tensor:
        """float32 ``[n]`` loss multipliers of the current epoch (1 except infobatch's kept
        low-score samples)."""
        self._ensure_epoch()
        return self._weights

    def weight_of(self, indices: torch.Tensor) -> torch.Tensor:
        """float32 multipliers of the samples ``indices`` (on ``indices``' device)."""
        where = "rk.SubsetSampler.weight_of"
        indices = check_tensor(where, "indices", indices)
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"{where}: indices must be an integer tensor, got {indices.dtype}")
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.n:
                bad = low if low < 0 else high
                raise ValueError(f"{where}: indices must be in [0, {self.n}), got {bad}")
        return self.weights[indices.cpu().long()].to(indices.device)

    @property
    def order(self) -> torch.Tensor:
        """int64 ``[epoch_size(epoch)]``: the current epoch's shuffled subset, before padding and
        sharding (the same on every rank)."""
        self._ensure_epoch()
        return self._order

    def local_indices(self, start: int = 0) -> torch.Tensor:
        """int64: this rank's indices for the current epoch, in yield order.

        With ``start = 0`` these are the ``len(self)`` indices :meth:`__iter__` yields. A
        training loop that has consumed the first ``start`` positions of :attr:`order` (all
        ranks together, e.g. ``steps * global_batch``) gets the shard of the rest: ``order[start:]``
        padded from the start of :attr:`order` to a multiple of ``num_replicas``, rank ``r``
        taking positions ``r, r + num_replicas, ...``. Because the sharding interleaves, a loop
        in which every rank consumes ``b`` local indices per step consumes the global positions
        ``[s * b * num_replicas, (s + 1) * b * num_replicas)`` in step ``s``: a run checkpointed
        mid-epoch can resume with another ``num_replicas`` from ``start``.
        """
        self._ensure_epoch()
        m = self._order.shape[0]
        start = check_int("rk.SubsetSampler.local_indices", "start", start, 0, m)
        rest = self._order[start:]
        total = math.ceil(rest.shape[0] / self.num_replicas) * self.num_replicas
        if total > rest.shape[0]:
            repeats = math.ceil((total - rest.shape[0]) / m)
            rest = torch.cat([rest, self._order.repeat(repeats)[: total - rest.shape[0]]])
        return rest[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.local_indices().tolist())

    def __len__(self) -> int:
        return self.num_samples

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        """The current epoch and its subset order and weights: resuming mid-epoch restores the
        exact subset even though the score table has moved on since it was picked."""
        self._ensure_epoch()
        return {
            "epoch": self._epoch,
            "order": self._order.clone(),
            "weights": self._weights.clone(),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict`'s output (validated first; on error nothing changes)."""
        where = "rk.SubsetSampler.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: state must be a mapping, got {type(state).__name__}")
        if set(state) != {"epoch", "order", "weights"}:
            raise ValueError(f"{where}: expected keys epoch, order, weights; got {sorted(state)}")
        epoch = check_int(where, "epoch", state["epoch"], 0)
        m = self.epoch_size(epoch)
        order = check_tensor(where, "order", state["order"], ndim=1, dtypes=(torch.int64,))
        if order.shape[0] != m:
            raise ValueError(
                f"{where}: order must have {m} entries (the subset size), got {order.shape[0]}"
            )
        if m and (int(order.min()) < 0 or int(order.max()) >= self.n):
            raise ValueError(f"{where}: order must hold indices in [0, {self.n})")
        weights = check_tensor(where, "weights", state["weights"], ndim=1, dtypes=(torch.float32,))
        if weights.shape[0] != self.n:
            raise ValueError(f"{where}: weights must have {self.n} entries, got {weights.shape[0]}")
        self._order = order.cpu().clone()
        self._weights = weights.cpu().clone()
        self._epoch = epoch
        self._set_length(m)

    def __repr__(self) -> str:
        return (
            f"SubsetSampler(n={self.n}, budget={self.budget}, policy={self.policy!r}, "
            f"subset_size={self.subset_size}, num_replicas={self.num_replicas}, rank={self.rank})"
        )


# --------------------------------------------------------------------------------------------
# In-batch selection
# --------------------------------------------------------------------------------------------


def select_in_batch(
    scores: torch.Tensor, keep: int | float, *, largest: bool = True
) -> torch.Tensor:
    """Rows of a batch to back-propagate: int64 indices of the ``keep`` top-scoring rows.

    Score a large batch without gradients (e.g. per-sample losses under ``torch.no_grad()``, or
    :func:`rela_kernels.score_and_select`), then run forward+backward on ``batch[indices]`` only.

    Args:
        scores: ``[B]`` float32/float16/bfloat16 per-row scores, no NaN (detached here).
        keep: an ``int`` is a row count in ``[0, B]``; a ``float`` is a fraction in (0, 1], of
            which ``max(1, floor(keep * B))`` rows are kept. (So ``1`` keeps one row and ``1.0``
            keeps them all.)
        largest: keep the highest scores (hardest rows, the default) or the lowest.

    Returns:
        int64 indices on ``scores``' device, ascending; ties go to the lower index.
    """
    where = "rk.select_in_batch"
    scores = check_tensor(where, "scores", scores, ndim=1, dtypes=SCORE_DTYPES, shape_hint="[B]")
    b = scores.shape[0]
    if isinstance(keep, bool) or not isinstance(keep, (numbers.Integral, numbers.Real)):
        raise TypeError(
            f"{where}: keep must be an int (row count) or a float (fraction), "
            f"got {type(keep).__name__}"
        )
    if isinstance(keep, numbers.Integral):
        count = check_int(where, "keep", keep, 0, b)
    else:
        fraction = check_fraction(where, "keep", keep)
        if b == 0:
            raise ValueError(f"{where}: scores must have at least one row to keep a fraction of")
        count = subset_size(b, fraction)
    largest = check_largest(where, largest)
    check_no_nan(where, "scores", scores)
    return select_topk(scores.detach(), count, largest=largest)


# --------------------------------------------------------------------------------------------
# Streaming top-k
# --------------------------------------------------------------------------------------------


class StreamingTopK:
    """Top-k over scores fed in chunks; memory O(k + chunk).

    ``update(scores_chunk, base_index)`` feeds the scores of global indices
    ``base_index, ..., base_index + len - 1``. Chunks may arrive in any order and leave gaps, but
    must not overlap (ValueError). :meth:`result` then equals :func:`rela_kernels.select_topk` of
    all fed scores placed at their global indices: the k highest (lowest) scores, ties to the lower
    global index, ascending.

    How: the k best so far are kept sorted by global index. Each chunk is merged by one
    ``select_topk`` over the kept entries and the chunk laid out in global-index order (a plain
    concatenation when chunks arrive in increasing order, else a sort of the candidates by index),
    so the position tie-break of ``select_topk`` is the global-index tie-break. Scores are kept as
    float32, which holds float16/bfloat16 values exactly.

    Args:
        k: how many to keep (>= 0).
        largest: highest (default) or lowest scores.
    """

    def __init__(self, k: int, *, largest: bool = True) -> None:
        where = "rk.StreamingTopK"
        self.k = check_int(where, "k", k, 0)
        self.largest = check_largest(where, largest)
        self._values: torch.Tensor | None = None  # float32 [<= k], by ascending global index
        self._indices: torch.Tensor | None = None  # int64, ascending
        # Fed index ranges [start, end), sorted, disjoint, touching ranges merged: O(gaps).
        self._ranges: list[list[int]] = []
        self.count = 0  # scores fed so far

    def _overlap(self, start: int, end: int) -> tuple[int, int] | None:
        """A fed range that intersects [start, end), if any (checks the two neighbours)."""
        slot = bisect.bisect_right(self._ranges, [start, math.inf])
        for fed in self._ranges[max(0, slot - 1) : slot + 1]:
            if fed[0] < end and start < fed[1]:
                return fed[0], fed[1]
        return None

    def _record(self, start: int, end: int) -> None:
        slot = bisect.bisect_right(self._ranges, [start, math.inf])
        self._ranges.insert(slot, [start, end])
        # Merge with the right, then the left neighbour where they touch.
        if slot + 1 < len(self._ranges) and self._ranges[slot + 1][0] == end:
            self._ranges[slot][1] = self._ranges.pop(slot + 1)[1]
        if slot > 0 and self._ranges[slot - 1][1] == start:
            self._ranges[slot - 1][1] = self._ranges.pop(slot)[1]

    def update(self, scores: torch.Tensor, base_index: int | None = None) -> None:
        """Feed ``scores`` (1-D, no NaN) as global indices ``base_index ...``.

        ``base_index`` defaults to just after the highest index fed so far (0 at first), so chunks
        fed in order need not count. On error nothing changes.
        """
        where = "rk.StreamingTopK.update"
        scores = check_tensor(
            where, "scores", scores, ndim=1, dtypes=SCORE_DTYPES, shape_hint="[chunk]"
        )
        first = self._ranges[0][0] if self._ranges else 0
        end = self._ranges[-1][1] if self._ranges else 0
        base = end if base_index is None else check_int(where, "base_index", base_index, 0)
        c = scores.shape[0]
        if self._values is not None and scores.device != self._values.device:
            raise ValueError(
                f"{where}: scores is on {scores.device} but earlier chunks were on "
                f"{self._values.device}"
            )
        clash = self._overlap(base, base + c) if c else None
        if clash is not None:
            raise ValueError(
                f"{where}: indices [{base}, {base + c}) overlap the indices "
                f"[{clash[0]}, {clash[1]}) already fed"
            )
        check_no_nan(where, "scores", scores)
        if c == 0:
            return
        values = scores.detach().to(torch.float32)
        indices = torch.arange(base, base + c, dtype=torch.int64, device=scores.device)
        if self._values is not None and self._values.numel():
            if base >= end:  # the usual case: chunks in increasing order
                values = torch.cat([self._values, values])
                indices = torch.cat([self._indices, indices])
            elif base + c <= first:
                values = torch.cat([values, self._values])
                indices = torch.cat([indices, self._indices])
            else:
                indices, order = torch.sort(torch.cat([self._indices, indices]))
                values = torch.cat([self._values, values])[order]
        chosen = select_topk(values, min(self.k, values.shape[0]), largest=self.largest)
        self._values, self._indices = values[chosen], indices[chosen]
        self._record(base, base + c)
        self.count += c

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, scores)``: int64 global indices of the top k, ascending, and their float32
        scores. ValueError if fewer than k scores were fed (as select_topk with k > N)."""
        if self.count < self.k:
            raise ValueError(
                f"rk.StreamingTopK.result: k must be at most the number of scores fed "
                f"({self.count}), got {self.k}"
            )
        if self._indices is None:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32)
        return self._indices.clone(), self._values.clone()

    def __repr__(self) -> str:
        return f"StreamingTopK(k={self.k}, largest={self.largest}, fed={self.count})"
