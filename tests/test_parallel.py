"""Data parallelism over exactly the parameters a step trains (``rela_train.parallel``).

Checked on one process: for every kind of step (ReLA, BYOL, a blend, a frozen backbone) the
parameters that receive a gradient are exactly the trainable ones of ``step_modules`` (so DDP needs
no search for unused parameters); a ``PhaseParallel`` over a one-rank gloo group gives the plain
objective's gradients bit for bit; and ``close`` releases every DDP wrapper (their reducers hold
the process group, which must not be destroyed from a reducer).
"""

from __future__ import annotations

import datetime
import gc
import socket
import weakref

import pytest
import torch
import torch.distributed as dist
from rela_train.engine import Trainer
from rela_train.learner import step_modules
from rela_train.parallel import PhaseParallel
from rela_train.presets import get_preset

KINDS = [("rela", False, False), ("byol", False, False), ("byol", True, False),
         ("byol", False, True), ("byol", True, True)]  # fmt: skip


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    config = get_preset("synthetic-test").replace(prior="pixels:8", eval_every=0)
    return Trainer(config, tmp_path_factory.mktemp("run") / "run", log=lambda _: None)


def _forward_backward(trainer: Trainer, objective, kind) -> dict[str, torch.Tensor]:
    phase, blend, frozen = kind
    trainer.learner.zero_grad(set_to_none=True)
    indices = torch.arange(8)
    g = torch.Generator().manual_seed(0)
    views = trainer.augment[phase](trainer.train_source.images[indices], g)
    prior = trainer.prior.rows(indices, trainer.device)
    per_sample, _, logits = objective(
        views, phase, prior, True, rela_weight=0.5 if blend else 0.0, freeze_backbone=frozen
    )
    (per_sample.mean() + logits.square().mean()).backward()
    return {
        name: p.grad.clone() for name, p in trainer.learner.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_trains_exactly_the_parameters_of_its_modules(trainer: Trainer, kind) -> None:
    phase, blend, frozen = kind
    learner = trainer.learner
    modules = step_modules(learner, phase, blend=blend, freeze_backbone=frozen)
    wrapped = {id(p) for m in modules.values() for p in m.parameters() if p.requires_grad}
    grads = _forward_backward(trainer, trainer.objective, kind)
    trained = {id(p) for name, p in learner.named_parameters() if name in grads}
    assert trained == wrapped
    assert ("backbone" in modules) != frozen
    assert ("rela_head" in modules) == (phase == "rela" or blend)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_phase_parallel_gives_the_plain_gradients_and_releases_its_wrappers(
    trainer: Trainer,
) -> None:
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, True, datetime.timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        parallel = PhaseParallel(trainer.objective, device=trainer.device)
        for kind in KINDS:
            plain = _forward_backward(trainer, trainer.objective, kind)
            wrapped = _forward_backward(trainer, parallel, kind)
            assert plain.keys() == wrapped.keys()
            assert all(torch.equal(plain[name], wrapped[name]) for name in plain), kind
        ddps = [
            weakref.ref(parallel.wrapper(phase, blend=blend, freeze_backbone=frozen))
            for phase, blend, frozen in KINDS
        ]
        parallel.close()
        gc.collect()
        assert all(ref() is None for ref in ddps)
    finally:
        dist.destroy_process_group()
