"""`make bench`: every op benchmark on every device present, results to benchmarks/results/.

python benchmarks/run_all.py            # CPU, plus CUDA when a GPU is visible
python benchmarks/run_all.py --quick    # smoke run, nothing saved
python benchmarks/run_all.py --heavy    # also the 1.28M x 768 PCA fit (writes ~2 GB to /tmp)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str) -> int:
    path = HERE / script
    if not path.exists():
        print(f"-- {script}: not present, skipped")
        return 0
    command = [sys.executable, str(path), *args]
    print(f"-- {' '.join(command[1:])}", flush=True)
    return subprocess.call(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--heavy", action="store_true")
    args = parser.parse_args()
    quick = ["--quick"] if args.quick else []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failures = 0
    for device in devices:
        failures += run("bench_loss.py", "--device", device, *quick) != 0
        failures += run("bench_select.py", "--device", device, *quick) != 0
    failures += run("bench_train_step.py", *quick) != 0
    if args.heavy:
        failures += run("bench_pca.py") != 0
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
