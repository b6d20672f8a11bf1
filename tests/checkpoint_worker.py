"""One process, or one torchrun rank, of the step-checkpoint tests (``test_step_checkpoints.py``).

``python checkpoint_worker.py SPEC_JSON``: trains the ``synthetic-test`` preset with the spec's
``config`` changes in ``out`` (``resume``: continue it), and SIGKILLs itself right after optimizer
step ``kill_at`` when it is given: the process dies with no chance to clean up, as on an
out-of-memory kill or a node failure.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main() -> None:
    import torch
    from rela_train.engine import Hooks, Trainer
    from rela_train.presets import get_preset

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    config = get_preset("synthetic-test").replace(**spec["config"])
    kill_at = spec.get("kill_at")

    def on_step_end(trainer: Trainer) -> None:
        if trainer.counters.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(
        config, spec["out"], resume=spec.get("resume", False), hooks=Hooks(on_step_end=on_step_end),
        log=lambda _: None,
    )  # fmt: skip
    print(trainer.run().status, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # As `rela-train` does for a rank of a distributed job (rela_train.cli.run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
