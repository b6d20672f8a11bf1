"""``rela-train demo``: BYOL on all the data vs BYOL + ReLA on half of it, on Fashion-MNIST.

Both runs use the ``fashion-mnist-demo`` preset (same model, crops, epochs, seed); the ReLA run
adds a free prior (raw pixels by default, PCA-whitened into targets) and trains each epoch on a
random 50% subset. Everything printed comes from the two runs' ``summary.json`` files.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rela_train.config import given_changes
from rela_train.data.fashion_mnist import load_fashion_mnist
from rela_train.engine import Hooks
from rela_train.presets import get_preset
from rela_train.report import format_table, load_run, plot_runs
from rela_train.runs import fit

__all__ = ["run_demo"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"
    except OSError:
        return "load average unknown"


def _no_switch(summary: dict[str, Any]) -> str:
    rho = summary.get("last_rho")
    why = f"; last rho {rho:.3f} < 0.995" if rho is not None else ""
    return (
        f"ReLA never switched to BYOL (--switch {summary['switch']}: the plateau rule did not "
        f"fire in {summary['steps']} steps{why})"
    )


def run_demo(
    out: str | os.PathLike[str] | None = None,
    *,
    data_dir: str | None = None,
    epochs: int | None = None,
    budget: float = 0.5,
    prior: str = "pixels:16",
    threads: int | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    hooks: Hooks | None = None,
    log: Callable[[str], None] = _log,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run both trainings and print the comparison; returns both summaries and the plot path."""
    out = Path(out) if out is not None else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    for name in ("byol", "rela"):
        if (out / name / "summary.json").exists() or (out / name / "checkpoints").exists():
            raise ValueError(f"{out / name} already holds a run; choose another --out")
    load_fashion_mnist(data_dir, "test")  # fail early, with install instructions
    changes: dict[str, Any] = {
        "progress": progress,
        **(overrides or {}),
        **given_changes(data_dir=data_dir, epochs=epochs, threads=threads),
    }
    base = get_preset("fashion-mnist-demo").replace(**changes)
    rela = base.replace(prior=prior, budget=budget, policy="random")
    echo(
        f"rela-train demo: Fashion-MNIST, {base.train_subset or 60000} training images, "
        f"{base.val_subset or 10000} test images, {base.arch} width {base.width} at "
        f"{base.image_size} px, {base.epochs} epochs, batch {base.batch_size}; "
        f"{_load_average()}; results in {out}"
    )
    start = time.perf_counter()
    summaries = {}
    for name, config, what in (
        ("byol", base, "BYOL on all the data"),
        ("rela", rela, f"BYOL + ReLA (prior {prior}) on a {budget:.0%} subset per epoch"),
    ):
        echo(f"[{name}] {what} ...")
        result = fit(config, out / name, hooks=hooks, log=log, preset="fashion-mnist-demo")
        if result.status != "finished":
            raise KeyboardInterrupt
        summaries[name] = result.summary
    total = time.perf_counter() - start
    runs = [load_run(out / "byol"), load_run(out / "rela")]
    plot = plot_runs(runs, out / "demo.png")
    byol, rela_s = summaries["byol"], summaries["rela"]
    echo("")
    echo(format_table(runs))
    echo("")
    delta = 100 * (rela_s["knn_acc"] - byol["knn_acc"])
    echo(
        f"ReLA at {budget:.0%} budget vs BYOL on all data: kNN {delta:+.2f} points with "
        f"{rela_s['samples_seen'] / max(1, byol['samples_seen']):.0%} of the samples and "
        f"{rela_s['train_time'] / max(1e-9, byol['train_time']):.0%} of the training time."
    )
    switch = (
        f"ReLA switched to BYOL after step {rela_s['switch_step']} "
        f"(epoch {rela_s['switch_epoch'] + 1})"
        if rela_s.get("switch_step") is not None
        else _no_switch(rela_s)
    )
    echo(f"{switch}. Demo total {total:.0f} s (training + evaluation); {_load_average()}.")
    echo(f"Plot: {plot}")
    return {"byol": byol, "rela": rela_s, "plot": str(plot), "total_time": total, "out": str(out)}
