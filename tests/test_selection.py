"""Selection engine in one process: in-batch selection, streaming top-k, score table, sampler."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES
from torch.utils.data import DataLoader, TensorDataset

import rela_kernels as rk
from rela_kernels import reference
from rela_kernels.selection import POLICIES, subset_size

# ---------------------------------------------------------------------------------------------
# select_in_batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_in_batch(dtype, generator):
    scores = torch.randint(0, 7, (257,), generator=generator).to(dtype)
    for keep, count in ((0, 0), (1, 1), (100, 100), (257, 257), (0.5, 128), (1.0, 257)):
        for largest in (True, False):
            got = rk.select_in_batch(scores, keep, largest=largest)
            assert torch.equal(got, reference.select_topk(scores, count, largest))
    assert rk.select_in_batch(scores, 1e-9).shape == (1,)  # a fraction keeps at least one row


def test_select_in_batch_detaches(generator):
    logits = torch.randn(33, 4, generator=generator, requires_grad=True)
    losses = logits.pow(2).sum(dim=1)
    got = rk.select_in_batch(losses, 0.25)
    assert torch.equal(got, reference.select_topk(losses.detach(), 8, True))
    assert not got.requires_grad


def test_select_in_batch_bad_input(generator):
    scores = torch.randn(10, generator=generator)
    before = scores.clone()
    cases = [
        (0.0, ValueError, r"keep must be in \(0, 1\], got 0.0"),
        (1.5, ValueError, r"keep must be in \(0, 1\], got 1.5"),
        (float("nan"), ValueError, r"keep must be in \(0, 1\]"),
        (-1, ValueError, r"keep must be in \[0, 10\], got -1"),
        (11, ValueError, r"keep must be in \[0, 10\], got 11"),
        (True, TypeError, "keep must be an int .* or a float .*, got bool"),
        ("half", TypeError, "keep must be an int .* or a float .*, got str"),
    ]
    for keep, error, message in cases:
        with pytest.raises(error, match=message):
            rk.select_in_batch(scores, keep)
    with pytest.raises(ValueError, match="scores must be 1-D"):
        rk.select_in_batch(scores.view(2, 5), 1)
    with pytest.raises(TypeError, match="largest must be a bool"):
        rk.select_in_batch(scores, 1, largest=None)
    with pytest.raises(ValueError, match="at least one row"):
        rk.select_in_batch(torch.empty(0), 0.5)
    assert rk.select_in_batch(torch.empty(0), 0).tolist() == []
    nan = scores.clone()
    nan[3] = float("nan")
    with pytest.raises(ValueError, match="scores must not contain NaN, got 1"):
        rk.select_in_batch(nan, 2)
    assert torch.equal(scores, before)


# ---------------------------------------------------------------------------------------------
# StreamingTopK
# ---------------------------------------------------------------------------------------------


def _chunks(n: int, g: torch.Generator) -> list[tuple[int, int]]:
    """Random [start, end) cuts of [0, n), including empty chunks."""
    cuts = torch.randint(0, n + 1, (6,), generator=g).tolist()
    bounds = sorted({0, n, *cuts})
    pieces = list(zip(bounds[:-1], bounds[1:], strict=True))
    return pieces + [(n // 2, n // 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ("increasing", "decreasing", "shuffled", "default_base"))
def test_streaming_equals_one_shot(dtype, order, generator):
    n = 3001
    # Few distinct values: ties across chunk boundaries must go to the lower global index.
    scores = torch.randint(-3, 4, (n,), generator=generator).to(dtype)
    scores[torch.rand(n, generator=generator) < 0.05] = float("inf")
    pieces = _chunks(n, generator)
    if order == "decreasing":
        pieces = pieces[::-1]
    elif order == "shuffled":
        perm = torch.randperm(len(pieces), generator=generator).tolist()
        pieces = [pieces[i] for i in perm]
    for k in (0, 1, 17, n // 2, n):
        for largest in (True, False):
            stream = rk.StreamingTopK(k, largest=largest)
            for start, end in sorted(pieces) if order == "default_base" else pieces:
                if order == "default_base":
                    if start != end:
                        stream.update(scores[start:end])
                else:
                    stream.update(scores[start:end], start)
            assert stream.count == n
            indices, values = stream.result()
            want = reference.select_topk(scores, k, largest)
            assert torch.equal(indices, want), (order, k, largest)
            assert torch.equal(values, scores[want].float())


def test_streaming_gaps_and_large_chunks(generator):
    """Index ranges with gaps: the same as select_topk over the fed scores at their positions."""
    scores = torch.randn(200_000, generator=generator)
    fed = torch.zeros(200_000, dtype=torch.bool)
    stream = rk.StreamingTopK(1000, largest=False)
    for start, end in ((150_000, 200_000), (0, 40_000), (60_000, 150_000)):
        stream.update(scores[start:end], start)
        fed[start:end] = True
    positions = torch.nonzero(fed).flatten()
    want = positions[reference.select_topk(scores[fed], 1000, False)]
    assert torch.equal(stream.result()[0], want)


def test_streaming_bad_input(generator):
    stream = rk.StreamingTopK(5)
    stream.update(torch.randn(10, generator=generator), 10)
    state = (stream.count, stream.result()[0].clone(), [list(r) for r in stream._ranges])
    with pytest.raises(ValueError, match=r"indices \[15, 18\) overlap the indices \[10, 20\)"):
        stream.update(torch.randn(3, generator=generator), 15)
    with pytest.raises(ValueError, match=r"indices \[5, 11\) overlap"):
        stream.update(torch.randn(6, generator=generator), 5)
    nan = torch.randn(4, generator=generator)
    nan[1] = float("nan")
    with pytest.raises(ValueError, match="scores must not contain NaN, got 1"):
        stream.update(nan, 30)
    with pytest.raises(ValueError, match="base_index must be >= 0, got -4"):
        stream.update(torch.randn(4, generator=generator), -4)
    with pytest.raises(TypeError, match="scores must have dtype"):
        stream.update(torch.arange(4), 30)
    with pytest.raises(ValueError, match="scores must be 1-D"):
        stream.update(torch.randn(2, 2, generator=generator), 30)
    assert (stream.count, [list(r) for r in stream._ranges]) == (state[0], state[2])
    assert torch.equal(stream.result()[0], state[1])
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        rk.StreamingTopK(-1)
    with pytest.raises(TypeError, match="largest must be a bool"):
        rk.StreamingTopK(1, largest=0)


def test_streaming_result_needs_k_scores(generator):
    stream = rk.StreamingTopK(11)
    stream.update(torch.randn(10, generator=generator))
    with pytest.raises(ValueError, match=r"k must be at most the number of scores fed \(10\)"):
        stream.result()
    stream.update(torch.randn(1, generator=generator))
    assert stream.result()[0].shape == (11,)
    empty = rk.StreamingTopK(0)
    assert empty.result()[0].tolist() == []


# ---------------------------------------------------------------------------------------------
# ScoreTable
# ---------------------------------------------------------------------------------------------


def test_score_table_update_and_state(generator):
    table = rk.ScoreTable(10, init=2.0)
    assert table.scores.dtype == torch.float32 and torch.all(table.scores == 2.0)
    assert len(table) == 10 and table.device == torch.device("cpu")
    table.update(torch.tensor([1, 3, 1]), torch.tensor([0.5, 0.25, 0.75], dtype=torch.float16))
    assert table.scores[1] == 0.75  # duplicates: the last write wins
    assert table.scores[3] == 0.25
    table.update(torch.tensor([], dtype=torch.int64), torch.tensor([]))
    table.update(torch.tensor([9], dtype=torch.int32), torch.tensor([float("inf")]))
    assert table.scores[9] == float("inf")
    state = table.state_dict()
    other = rk.ScoreTable(10)
    other.load_state_dict(state)
    assert torch.equal(other.scores, table.scores)
    state["scores"][0] = -5.0  # the state is a copy
    assert table.scores[0] == 2.0


def test_score_table_many_duplicates(generator):
    table = rk.ScoreTable(50)
    indices = torch.randint(0, 50, (1000,), generator=generator)
    values = torch.randn(1000, generator=generator)
    table.update(indices, values)
    want = torch.full((50,), 2.0)
    for i, v in zip(indices.tolist(), values.tolist(), strict=True):
        want[i] = v
    assert torch.equal(table.scores, want)


def test_score_table_bad_input(generator):
    table = rk.ScoreTable(10)
    table.update(torch.arange(10), torch.arange(10).float())
    before = table.scores.clone()
    idx, val = torch.tensor([1, 2]), torch.tensor([0.1, 0.2])
    cases = [
        ((torch.tensor([1, 10]), val), ValueError, r"indices must be in \[0, 10\) .*got 10"),
        ((torch.tensor([-1, 2]), val), ValueError, r"indices must be in \[0, 10\) .*got -1"),
        (
            (idx, torch.tensor([0.1])),
            ValueError,
            r"scores must have one entry per index \(2\), got 1",
        ),
        ((idx.float(), val), TypeError, "indices must be an integer tensor, got torch.float32"),
        ((idx.bool(), val), TypeError, "indices must be an integer tensor, got torch.bool"),
        ((idx, torch.tensor([1, 2])), TypeError, "scores must be a floating-point tensor"),
        ((idx, torch.tensor([0.1, float("nan")])), ValueError, "scores must not contain NaN"),
        (([1, 2], val), TypeError, "indices must be a torch.Tensor, got list"),
        ((idx.view(2, 1), val), ValueError, "indices must be 1-D"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            table.update(*args)
    assert torch.equal(table.scores, before)
    with pytest.raises(ValueError, match=r"scores must have 10 entries \(the table size\), got 9"):
        table.load_state_dict({"scores": torch.zeros(9)})
    with pytest.raises(ValueError, match="expected the single key 'scores'"):
        table.load_state_dict({"values": torch.zeros(10)})
    with pytest.raises(ValueError, match="must not contain NaN"):
        table.load_state_dict({"scores": torch.full((10,), float("nan"))})
    assert torch.equal(table.scores, before)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        rk.ScoreTable(0)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        rk.ScoreTable(10.0)
    with pytest.raises(ValueError, match="init must not be NaN"):
        rk.ScoreTable(3, init=float("nan"))


# ---------------------------------------------------------------------------------------------
# SubsetSampler
# ---------------------------------------------------------------------------------------------


def _table(scores: torch.Tensor) -> rk.ScoreTable:
    table = rk.ScoreTable(scores.shape[0])
    table.update(torch.arange(scores.shape[0]), scores)
    return table


def test_subset_size():
    assert subset_size(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in binary
    assert subset_size(10, 1.0) == 10
    assert subset_size(10, 0.01) == 1
    assert subset_size(7, 0.5) == 3
    assert subset_size(1_281_167, 0.1) == 128_116


def test_random_policy(generator):
    n, budget = 1000, 0.3
    sampler = rk.SubsetSampler(n, budget, seed=7)
    assert len(sampler) == 300 and sampler.epoch is None
    first = list(sampler)  # before set_epoch: epoch 0
    assert sampler.epoch == 0
    assert len(first) == 300 and len(set(first)) == 300 and all(0 <= i < n for i in first)
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert torch.equal(sampler.subset, torch.tensor(sorted(first)))
    sampler.set_epoch(1)
    second = list(sampler)
    assert set(second) != set(first)
    again = rk.SubsetSampler(n, budget, seed=7)
    again.set_epoch(1)
    assert list(again) == second  # same seed + epoch, same subset and order
    other_seed = rk.SubsetSampler(n, budget, seed=8)
    other_seed.set_epoch(1)
    assert list(other_seed) != second
    assert torch.all(sampler.weights == 1.0)
    assert sampler.subset.tolist() != list(range(300)) and sorted(second) != second  # shuffled


def test_random_policy_is_uniform():
    """Every sample is drawn with probability budget (loose bound over 400 epochs)."""
    n, budget, epochs = 50, 0.2, 400
    counts = torch.zeros(n)
    sampler = rk.SubsetSampler(n, budget)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts[sampler.subset] += 1
    expected = epochs * budget
    assert torch.all((counts - expected).abs() < 5 * math.sqrt(expected))


@pytest.mark.parametrize("policy", ("hard", "easy"))
def test_hard_and_easy(policy, generator):
    n = 1000
    scores = torch.randperm(n, generator=generator).float()  # distinct: one right answer
    table = _table(scores)
    sampler = rk.SubsetSampler(n, 0.1, policy, score_table=table, seed=3)
    sampler.set_epoch(5)
    order = torch.argsort(scores, descending=policy == "hard")
    assert torch.equal(sampler.subset, order[:100].sort().values)
    assert sorted(sampler) == sampler.subset.tolist()
    assert torch.all(sampler.weights == 1.0)
    # Ties (a fresh table): the lowest indices, per select_topk's contract.
    fresh = rk.SubsetSampler(n, 0.1, policy, score_table=rk.ScoreTable(n))
    assert fresh.subset.tolist() == list(range(100))


def test_infobatch_keeps_all_high_and_rescales_low(generator):
    n = 100
    scores = torch.cat([torch.full((30,), 5.0), torch.full((70,), 1.0)])
    scores = scores[torch.randperm(n, generator=generator)]
    high = set(torch.nonzero(scores >= scores.mean()).flatten().tolist())
    assert len(high) == 30
    sampler = rk.SubsetSampler(n, 0.5, "infobatch", score_table=_table(scores), seed=1)
    sampler.set_epoch(2)
    subset = set(sampler.subset.tolist())
    assert len(subset) == 50 and high <= subset
    kept_low = subset - high
    assert len(kept_low) == 20
    weights = sampler.weights
    assert weights.shape == (n,) and weights.dtype == torch.float32
    for i in range(n):
        assert weights[i] == (70 / 20 if i in kept_low else 1.0)
    batch = torch.tensor(sorted(kept_low)[:3] + sorted(high)[:2])
    assert sampler.weight_of(batch).tolist() == [3.5, 3.5, 3.5, 1.0, 1.0]
    sampler.set_epoch(3)
    assert set(sampler.subset.tolist()) - high != kept_low  # the low share is redrawn


def test_infobatch_budget_below_high_count(generator):
    n = 100
    scores = torch.randn(n, generator=generator)
    high = set(torch.nonzero(scores.double() >= scores.double().mean()).flatten().tolist())
    sampler = rk.SubsetSampler(n, 0.1, "infobatch", score_table=_table(scores))
    assert set(sampler.subset.tolist()) <= high
    assert torch.all(sampler.weights == 1.0)
    # Scores equal to the mean count as high: a fresh table makes infobatch uniform random.
    fresh = rk.SubsetSampler(n, 0.1, "infobatch", score_table=rk.ScoreTable(n))
    assert fresh.subset.tolist() != list(range(10))


def test_infobatch_with_infinite_scores(generator):
    scores = torch.randn(40, generator=generator)
    scores[3] = float("inf")
    sampler = rk.SubsetSampler(40, 0.25, "infobatch", score_table=_table(scores))
    assert 3 in sampler.subset.tolist() and sampler.weights.max() == 39 / 9  # only +inf is high
    scores[7] = float("-inf")  # the mean is NaN: every sample counts as high
    sampler = rk.SubsetSampler(40, 0.25, "infobatch", score_table=_table(scores))
    assert sampler.subset.shape == (10,) and torch.all(sampler.weights == 1.0)


def test_sharding_and_padding():
    n, budget = 10, 0.5  # 5 samples over 3 replicas: padded to 6 by repeating the first one
    shards = []
    for rank in range(3):
        sampler = rk.SubsetSampler(n, budget, seed=4, num_replicas=3, rank=rank)
        sampler.set_epoch(9)
        assert len(sampler) == 2
        shards.append(list(sampler))
        order = sampler._order.tolist()
    padded = order + order[:1]
    assert shards == [padded[r::3] for r in range(3)]
    one = rk.SubsetSampler(10, 0.1, num_replicas=4, rank=3)  # 1 sample for 4 replicas
    assert len(one) == 1 and list(one) == one.subset.tolist()


def test_with_dataloader():
    data = TensorDataset(torch.arange(64))
    sampler = rk.SubsetSampler(64, 0.25, seed=2)
    sampler.set_epoch(1)
    seen = torch.cat([batch for (batch,) in DataLoader(data, batch_size=5, sampler=sampler)])
    assert seen.tolist() == list(sampler)


def test_sampler_state_dict(generator):
    table = _table(torch.randn(200, generator=generator))
    sampler = rk.SubsetSampler(200, 0.3, "infobatch", score_table=table, seed=5)
    sampler.set_epoch(4)
    state = sampler.state_dict()
    expected = list(sampler)
    table.update(torch.arange(200), torch.randn(200, generator=generator))  # the table moves on
    resumed = rk.SubsetSampler(200, 0.3, "infobatch", score_table=table, seed=5)
    resumed.load_state_dict(state)
    assert resumed.epoch == 4 and list(resumed) == expected
    assert torch.equal(resumed.weights, sampler.weights)
    with pytest.raises(ValueError, match=r"order must have 60 entries \(the subset size\)"):
        resumed.load_state_dict({**state, "order": state["order"][:10]})
    with pytest.raises(ValueError, match="expected keys epoch, order, weights"):
        resumed.load_state_dict({"epoch": 1})
    assert list(resumed) == expected


def test_sampler_bad_input():
    table = rk.ScoreTable(10)
    cases = [
        (dict(n=0, budget=0.5), ValueError, "n must be >= 1, got 0"),
        (dict(n=10, budget=0.0), ValueError, r"budget must be in \(0, 1\], got 0.0"),
        (dict(n=10, budget=1.01), ValueError, r"budget must be in \(0, 1\], got 1.01"),
        (dict(n=10, budget=-0.5), ValueError, r"budget must be in \(0, 1\], got -0.5"),
        (dict(n=10, budget=float("nan")), ValueError, r"budget must be in \(0, 1\]"),
        (dict(n=10, budget="0.5"), TypeError, "budget must be a float in .*, got str"),
        (dict(n=10, budget=0.5, policy="loss"), ValueError, "policy must be one of random, hard"),
        (dict(n=10, budget=0.5, policy="hard"), ValueError, "policy 'hard' needs a score_table"),
        (
            dict(n=11, budget=0.5, policy="easy", score_table=table),
            ValueError,
            r"score_table must have n=11 entries \(the dataset size\), got 10",
        ),
        (
            dict(n=10, budget=0.5, policy="hard", score_table=torch.zeros(10)),
            TypeError,
            "score_table must be an rk.ScoreTable, got Tensor",
        ),
        (dict(n=10, budget=0.5, num_replicas=0), ValueError, "num_replicas must be >= 1, got 0"),
        (dict(n=10, budget=0.5, num_replicas=2, rank=2), ValueError, r"rank must be in \[0, 1\]"),
        (dict(n=10, budget=0.5, seed=-1), ValueError, "seed must be in"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            rk.SubsetSampler(**kwargs)
    sampler = rk.SubsetSampler(10, 0.5)
    with pytest.raises(ValueError, match="epoch must be in"):
        sampler.set_epoch(-1)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 10\), got 10"):
        sampler.weight_of(torch.tensor([10]))
    assert sampler.epoch is None
    assert set(POLICIES) == {"random", "hard", "easy", "infobatch"}


@pytest.mark.parametrize(
    "n, budget, world", [(100, 0.37, 3), (7, 1.0, 8), (64, 0.5, 4), (97, 1.0, 2)]
)
def test_local_indices_from_a_start_shard_the_rest_of_the_order(n, budget, world):
    samplers = [
        rk.SubsetSampler(n, budget, num_replicas=world, rank=r, seed=5) for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(3)
    order = samplers[0].order
    assert all(torch.equal(s.order, order) for s in samplers)
    assert torch.equal(order.sort().values, samplers[0].subset)
    m = order.shape[0]
    for start in sorted({0, 1, min(world, m), m // 2, m - 1, m}):
        shards = [s.local_indices(start) for s in samplers]
        rest = order[start:]
        assert len({shard.shape[0] for shard in shards}) == 1
        if rest.numel():
            assert shards[0].shape[0] == -(-rest.shape[0] // world)
        # Interleaved: together the shards are order[start:] (then padding from order's start).
        merged = torch.stack(shards, dim=1).flatten()
        assert torch.equal(merged[: rest.shape[0]], rest)
        assert torch.equal(
            merged[rest.shape[0] :], order.repeat(world)[: merged.shape[0] - rest.shape[0]]
        )
    # start = 0 is what iteration yields.
    assert all(torch.equal(s.local_indices(), torch.tensor(list(s))) for s in samplers)


def test_local_indices_start_is_checked():
    sampler = rk.SubsetSampler(10, 0.5)
    for bad in (-1, 6, 2.5):
        with pytest.raises((ValueError, TypeError), match="start"):
            sampler.local_indices(bad)
