"""A 1-rank NCCL process group on a file store, then a short ReLA `fit` inside it
(``test_cuda_trainer.py``); writes what the test checks to ``OUT/nccl.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    from rela_train.engine import Hooks
    from rela_train.presets import get_preset
    from rela_train.runs import fit

    out = Path(sys.argv[1])
    store = dist.FileStore(str(out / "store"), 1)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    value = torch.full((4,), 3.0, device="cuda")
    dist.all_reduce(value)
    devices: list[str] = []
    config = get_preset("synthetic-test").replace(
        device="cuda", amp="bf16", channels_last=True, prior="pixels:8", budget=0.5,
        policy="hard", switch="const:0.5", probe_epochs=0,
    )  # fmt: skip
    hooks = Hooks(on_step_end=lambda trainer: devices.append(trainer.device.type))
    result = fit(config, out / "run", hooks=hooks, log=lambda _: None)
    record = {
        "backend": dist.get_backend(),
        "all_reduce": float(value[0]),
        "status": result.status,
        "steps": len(devices),
        "devices": sorted(set(devices)),
    }
    dist.destroy_process_group()
    (out / "nccl.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
