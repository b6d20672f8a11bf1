"""Selection semantics of issue 12, item 3: InfoBatch annealing (``--anneal``), the score table
across the ReLA -> BYOL switch, and what ``inbatch`` feeds the switch rule."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from rela_train import cli
from rela_train.config import TrainConfig
from rela_train.engine import TIME_FIELDS, Hooks, Trainer
from rela_train.presets import apply_recipe, get_preset
from rela_train.runs import fit

import rela_kernels as rk


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(**changes) -> TrainConfig:
    return get_preset("synthetic-test").replace(**changes)


def reference_annealed(epochs: int, anneal: float) -> set[int]:
    """The rule, in exact arithmetic: the last floor(anneal x epochs) epochs."""
    count = math.floor(Fraction(str(anneal)) * epochs)
    return set(range(epochs - count, epochs))


# -- the sampler -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_annealed_epochs_follow_the_rule(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        epochs = int(torch.randint(1, 60, (1,), generator=g))
        anneal = round(float(torch.rand(1, generator=g)) * 0.99, 3)
        sampler = rk.SubsetSampler(10, 0.5, anneal=anneal, epochs=epochs)
        got = {e for e in range(epochs) if sampler.is_annealed(e)}
        assert got == reference_annealed(epochs, anneal), (epochs, anneal)
        # InfoBatch's own test (e > (1 - delta) * epochs) agrees unless delta x epochs is whole.
        if (Fraction(str(anneal)) * epochs).denominator != 1:
            assert got == {e for e in range(epochs) if e > (1 - anneal) * epochs}


def test_infobatch_default_anneals_the_last_eighth() -> None:
    assert reference_annealed(16, 0.125) == {14, 15}
    assert TrainConfig(policy="infobatch").anneal_fraction == 0.125
    assert TrainConfig(policy="hard").anneal_fraction == 0.0


@pytest.mark.parametrize("policy", ["random", "hard", "easy", "infobatch"])
def test_an_annealed_epoch_takes_every_sample_with_weight_one(policy: str) -> None:
    n, epochs = 50, 8
    table = rk.ScoreTable(n)
    table.update(torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(1)))
    plain = rk.SubsetSampler(n, 0.3, policy, score_table=table, seed=4, num_replicas=3, rank=1)
    annealed = rk.SubsetSampler(
        n, 0.3, policy, score_table=table, seed=4, num_replicas=3, rank=1, anneal=0.25,
        epochs=epochs,
    )  # fmt: skip
    for epoch in range(epochs):
        plain.set_epoch(epoch)
        annealed.set_epoch(epoch)
        if epoch < 6:  # before annealing: exactly the un-annealed sampler
            assert torch.equal(annealed.order, plain.order)
            assert torch.equal(annealed.weights, plain.weights)
            assert len(annealed) == len(plain) == math.ceil(15 / 3)
            assert annealed.epoch_size(epoch) == 15
        else:
            assert torch.equal(annealed.subset, torch.arange(n))
            assert torch.equal(annealed.weights, torch.ones(n))
            assert len(annealed) == math.ceil(n / 3) == annealed.local_indices().shape[0]
            assert annealed.epoch_size(epoch) == n
            assert not torch.equal(annealed.order, torch.arange(n))  # shuffled


def test_an_annealed_epoch_resumes_from_its_state() -> None:
    sampler = rk.SubsetSampler(40, 0.5, seed=2, anneal=0.5, epochs=4)
    sampler.set_epoch(3)
    state = sampler.state_dict()
    again = rk.SubsetSampler(40, 0.5, seed=2, anneal=0.5, epochs=4)
    again.load_state_dict(state)
    assert torch.equal(again.order, sampler.order) and len(again) == 40


@pytest.mark.parametrize("anneal", [1.0, -0.1, 1.5, float("nan")])
def test_sampler_refuses_an_anneal_outside_0_1(anneal: float) -> None:
    with pytest.raises(ValueError, match="anneal must be in \\[0, 1\\)"):
        rk.SubsetSampler(10, 0.5, anneal=anneal, epochs=4)


def test_sampler_anneal_needs_the_epochs() -> None:
    with pytest.raises(ValueError, match="anneal > 0 needs epochs"):
        rk.SubsetSampler(10, 0.5, anneal=0.2)
    with pytest.raises(TypeError, match="anneal"):
        rk.SubsetSampler(10, 0.5, anneal=True, epochs=3)


def test_score_table_reset() -> None:
    table = rk.ScoreTable(5, init=1.5)
    table.update(torch.tensor([0, 3]), torch.tensor([0.1, 0.2]))
    table.reset()
    assert torch.equal(table.scores, torch.full((5,), 1.5))


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "shown"),
    [(["--anneal", "1"], "1.0"), (["--anneal=-0.5"], "-0.5"),
     (["--anneal", "0.2", "--policy", "inbatch"], "inbatch")],
)  # fmt: skip
def test_fit_refuses_a_bad_anneal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], shown: str
) -> None:
    out = tmp_path / "r"
    code = cli.main(["fit", "--preset", "synthetic-test", "--out", str(out), *argv])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--anneal" in last and shown in last
    assert not out.exists()


# -- in the trainer --------------------------------------------------------------------------


def test_annealing_in_the_trainer(tmp_path: Path) -> None:
    # 256 images, budget 0.5, batch 16: 8 pruned steps; the annealed last epoch takes 16.
    cfg = config(budget=0.5, policy="infobatch", anneal=0.5, epochs=2, eval_every=0)
    trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
    assert trainer.total_steps == 8 + 16
    seen = []
    trainer.hooks = Hooks(
        on_epoch_end=lambda t: seen.append((t.counters.global_step, t.counters.samples_seen))
    )
    assert trainer.run().status == "finished"
    assert seen == [(8, 128), (24, 384)]


def test_infobatch_anneals_by_default(tmp_path: Path) -> None:
    cfg = config(budget=0.5, policy="infobatch", epochs=8, eval_every=0)
    assert Trainer(cfg, tmp_path / "run", log=lambda _: None).total_steps == 7 * 8 + 16
    explicit = cfg.replace(anneal=0.0)
    assert Trainer(explicit, tmp_path / "run2", log=lambda _: None).total_steps == 8 * 8


def test_the_score_table_starts_over_at_the_switch(tmp_path: Path) -> None:
    # const:0.5 of 16 steps: ReLA for epoch 0, BYOL for epoch 1; `hard` at budget 0.5.
    cfg = config(
        prior="pixels:8", budget=0.5, policy="hard", switch="const:0.5", eval_every=0,
        probe_epochs=0,
    )  # fmt: skip
    at_epoch_end = []

    def record(trainer: Trainer) -> None:
        at_epoch_end.append(trainer.score_table.scores.clone())

    trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None, hooks=Hooks(on_epoch_end=record))
    assert trainer.run().status == "finished" and trainer.counters.switch_step == 8
    after_rela, after_byol = at_epoch_end
    # The ReLA scores of epoch 0 were dropped at the switch.
    assert torch.equal(after_rela, torch.full((256,), 2.0))
    # Epoch 1 had no BYOL scores to rank: a random draw, not the lowest indices (tie rule).
    epoch1 = trainer.sampler.subset
    assert not torch.equal(epoch1, torch.arange(128))
    # Only epoch 1's samples hold (BYOL) scores; everything else is still the initial 2.0.
    scored = torch.zeros(256, dtype=torch.bool)
    scored[epoch1] = True
    assert torch.all(after_byol[~scored] == 2.0)
    assert torch.all(after_byol[scored] < 2.0)


def test_inbatch_feeds_the_switch_the_scored_batch_mean(tmp_path: Path) -> None:
    cfg = config(
        prior="pixels:8", budget=0.25, policy="inbatch", switch="adaptive", epochs=1,
        eval_every=0, probe_epochs=0,
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
    scored: list[torch.Tensor] = []
    fed: list[float] = []
    select = trainer.micro_step.inbatch_select

    def spy_select(views, indices, prior, phase):
        chosen, scores = select(views, indices, prior, phase)
        scored.append(scores.detach().double().cpu())
        return chosen, scores

    after_step = trainer.switch.after_step

    def spy_after_step(loss: float, step: int) -> bool:
        fed.append(loss)
        return after_step(loss, step)

    trainer.micro_step.inbatch_select = spy_select
    trainer.switch.after_step = spy_after_step
    assert trainer.run().status == "finished"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kept = [x["loss"] for x in lines if "loss" in x and x.get("phase") == "rela"]
    assert len(fed) == len(scored) == len(kept) > 0  # one micro-batch per step here
    for value, scores, kept_mean in zip(fed, scored, kept, strict=True):
        assert value == pytest.approx(float(scores.mean()), rel=1e-9)
        assert value < kept_mean  # the kept rows are the hardest ones


def test_an_official_annealed_run_resumes_exactly(tmp_path: Path) -> None:
    # The official recipe (epoch switch, frozen head, constant schedules, official probe) with
    # infobatch annealing; stopped in the middle of the annealed epoch (steps 9-24).
    base = config(
        prior="pixels:8", budget=0.5, policy="infobatch", anneal=0.5, switch="const:0.5",
        recipe="official", eval_every=1,
    )  # fmt: skip
    cfg = apply_recipe(base, explicit={"probe_epochs"}).replace(probe_epochs=3)
    assert cfg.const_switch == "epoch" and cfg.probe == "official"
    full = fit(cfg, tmp_path / "full", log=lambda _: None)

    def stop(trainer: Trainer) -> None:
        if trainer.counters.global_step == 13:
            trainer.request_stop()

    first = fit(cfg, tmp_path / "resumed", hooks=Hooks(on_step_end=stop), log=lambda _: None)
    assert first.status == "interrupted"
    second = fit(cfg, tmp_path / "resumed", resume=True, log=lambda _: None)
    assert second.status == "finished" and second.summary["steps"] == full.summary["steps"] == 24

    def lines(run: Path) -> list[dict]:
        out = []
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            out.append({k: v for k, v in record.items() if k not in TIME_FIELDS + ("run_dir",)})
        return out

    assert lines(tmp_path / "resumed") == lines(tmp_path / "full")
    assert second.summary["linear_acc_official"] == full.summary["linear_acc_official"]
