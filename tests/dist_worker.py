"""One rank of the distributed training tests (``test_distributed_training.py``).

Run by ``torchrun --nproc-per-node 2 dist_worker.py SPEC.json``: joins a gloo group, then trains
each job of the spec in turn with a :class:`~rela_train.engine.Trainer` and writes, per job and
rank, what the test compares: the epoch subsets, the sample indices of every step, the step
losses (already averaged over ranks), the switch step and the run's status.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    from rela_train.engine import Hooks, Trainer
    from rela_train.presets import get_preset
    from rela_train.prior.loaders import ModelPrior

    # Rows this rank passes through the prior (its share of the embedding of the training set).
    encoded = [0]
    encode = ModelPrior.encode

    def counted(self, images):
        encoded[0] += len(images)
        return encode(self, images)

    ModelPrior.encode = counted

    spec = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    for job in spec["jobs"]:
        config = get_preset("synthetic-test").replace(**{**spec["config"], **job["config"]})
        record: dict = {"orders": {}, "steps": [], "losses": [], "phases": []}
        encoded[0] = 0

        def on_step_end(trainer: Trainer, job: dict = job, record: dict = record) -> None:
            record["orders"][str(trainer.counters.epoch)] = trainer.sampler.order.tolist()
            stop = job.get("stop_at")  # [epoch, step_in_epoch, rank asking]
            if (
                stop
                and [trainer.counters.epoch, trainer.counters.step_in_epoch] == stop[:2]
                and rank == stop[2]
            ):
                trainer.request_stop()

        trainer = Trainer(
            config, Path(spec["out"]) / job["name"], hooks=Hooks(on_step_end=on_step_end)
        )
        step = trainer.step

        def recorded(batches, step=step, record: dict = record):
            record["steps"].append(sorted(int(i) for b in batches for i in b.indices))
            result = step(batches)
            record["losses"].append(result["loss"])
            record["phases"].append(result["phase"])
            return result

        trainer.step = recorded
        result = trainer.run()
        record.update(
            status=result.status,
            switch_step=trainer.counters.switch_step,
            global_step=trainer.counters.global_step,
            steps_per_epoch=trainer.steps_per_epoch,
            accum_steps=trainer.accum_steps,
            prior_rows=encoded[0],
            train_images=trainer.train_source.n,
        )
        out = Path(spec["out"]) / f"{job['name']}.rank{rank}.json"
        out.write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
