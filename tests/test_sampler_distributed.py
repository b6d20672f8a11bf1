"""ScoreTable and SubsetSampler across two gloo processes (file:// rendezvous, no ports).

Each rank runs this file as a script (``--worker``); the test compares what the ranks wrote.
Subprocesses with a timeout, rather than torch.multiprocessing, so that a collective that hangs
fails the test instead of hanging CI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

WORLD = 2
N = 97
BUDGET = 0.3


def _rank_updates(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic, rank-dependent updates of different sizes (rank 1 sends nothing at step 1).
    Index 5 is written by both ranks at step 0: rank 1's value must win everywhere."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    size = [[13, 4], [6, 0]][step][rank]
    indices = torch.randint(0, N, (size,), generator=g)
    scores = torch.randn(size, generator=g)
    if step == 0:
        indices[0] = 5
    return indices, scores


def expected_table() -> torch.Tensor:
    """The table every rank must hold: all updates applied in rank order, last write wins."""
    table = torch.full((N,), 2.0)
    for step in range(2):
        for rank in range(WORLD):
            indices, scores = _rank_updates(rank, step)
            for i, s in zip(indices.tolist(), scores.tolist(), strict=True):
                table[i] = s
    return table


def worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    import rela_kernels as rk

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        table = rk.ScoreTable(N)
        for step in range(2):
            table.update(*_rank_updates(rank, step))
        # One rank passes a bad index: every rank raises (none blocks), no table changes.
        before = table.scores.clone()
        bad_index = N if rank == 1 else 0
        errors = []
        try:
            table.update(torch.tensor([bad_index]), torch.tensor([0.0]))
        except ValueError as error:
            errors.append(str(error))
        unchanged = torch.equal(table.scores, before)
        result: dict[str, object] = {
            "table": table.scores.clone(),
            "errors": errors,
            "unchanged": unchanged,
        }
        for policy in ("random", "hard", "easy", "infobatch"):
            sampler = rk.SubsetSampler(N, BUDGET, policy, score_table=table, seed=11)
            assert sampler.num_replicas == WORLD and sampler.rank == rank
            sampler.set_epoch(3)
            result[policy] = {
                "subset": sampler.subset,
                "local": list(sampler),
                "len": len(sampler),
                "weights": sampler.weights,
            }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    )
    init_file = tmp_path / "rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(rank), str(init_file), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{outputs[rank]}"

    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    want = expected_table()
    for r in range(WORLD):
        assert torch.equal(results[r]["table"], want), f"rank {r} table differs"
        assert results[r]["unchanged"]
    assert "indices must be in [0, 97)" in results[1]["errors"][0]
    assert "rank(s) [1] passed invalid" in results[0]["errors"][0]

    m = int(N * BUDGET)
    per_rank = -(-m // WORLD)
    for policy in ("random", "hard", "easy", "infobatch"):
        a, b = results[0][policy], results[1][policy]
        assert torch.equal(a["subset"], b["subset"]), policy
        assert torch.equal(a["weights"], b["weights"]), policy
        assert a["len"] == b["len"] == per_rank == len(a["local"]) == len(b["local"])
        subset = a["subset"].tolist()
        assert len(subset) == m == len(set(subset))
        merged = a["local"] + b["local"]
        # The shards cover the subset; the only repeats are the padding (total - m of them).
        assert set(merged) == set(subset)
        assert len(merged) - len(set(merged)) == WORLD * per_rank - m
    # Stable sorts keep tied scores in index order: the lower index wins, as in select_topk.
    hard = torch.argsort(want, descending=True, stable=True)[:m]
    easy = torch.argsort(want, stable=True)[:m]
    assert results[0]["hard"]["subset"].tolist() == sorted(hard.tolist())
    assert results[0]["easy"]["subset"].tolist() == sorted(easy.tolist())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("init_file")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    worker(args.worker, args.init_file, args.out_dir)
