"""Run the study's runs through the trainer's command line, a few at a time, resumably.

Each run is ``python -m rela_train fit ... --out OUT/runs/RUN_ID`` in a subprocess with one
thread; ``jobs`` of them run side by side. A run whose record exists is skipped; a run directory
with a checkpoint but no summary (a killed run) continues with ``fit --resume``; one with a
summary only needs its record. The transported prior's training is followed by writing its
network as an RGB checkpoint, which the runs that use it wait for.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rela_study.grid import RunSpec, transported_checkpoint
from rela_study.records import done_runs, write_record
from rela_study.transport import rgb_prior_checkpoint
from rela_train.checkpoint import checkpoint_path
from rela_train.step_evals import SINCE_SWITCH

__all__ = ["log", "main_until_stopped", "make_record", "run_study"]

# Summary fields copied into the record (those the trainer does not produce are left out).
METRICS = (
    "knn_acc",
    "linear_acc",
    "linear_acc_official",
    "linear_acc_official_std",
    "samples_seen",
    "train_time",
    "wall_time",
    "eval_time",
    "steps",
)


def log(message: str) -> None:
    """A study's progress line on stderr, with the time of day."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a study like Ctrl-C


def main_until_stopped(main: Callable[[], int]) -> None:
    """Exit with ``main()``'s status; Ctrl-C or SIGTERM stops the study (the running fits
    checkpoint) with status 130 and a line saying how to continue."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("study stopped; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)


def fit_command(python: str, run: RunSpec, run_dir: Path) -> list[str]:
    """The command that starts ``run`` in ``run_dir``, or continues it from its checkpoint."""
    if checkpoint_path(run_dir).is_file():
        return [python, "-m", "rela_train", "fit", "--resume", str(run_dir), "--no-progress"]
    return [python, "-m", "rela_train", "fit", *run.flags, "--out", str(run_dir)]


def make_record(
    run: RunSpec,
    summary: dict[str, Any],
    *,
    study: str,
    command: list[str],
    environment: dict[str, Any],
    seconds: float | None,
    cpu_seconds: float | None = None,
) -> dict[str, Any]:
    """The study's record of one finished run (from the trainer's ``summary.json``).
    ``seconds``: the wall time of the ``fit`` this study ran for it (None when the run had
    finished before and only its record was missing)."""
    curve = [
        {key: point.get(key) for key in ("epoch", "samples_seen", "train_time", "knn_acc")}
        for point in summary.get("evaluations", [])
    ]
    return {
        "study": study,
        "run": run.run_id,
        "row": run.row,
        "label": run.label,
        "core": run.core,
        "seed": run.seed,
        "prior": run.prior,
        "command": shlex.join(command),
        "metrics": {key: summary[key] for key in METRICS if summary.get(key) is not None},
        "switch": summary.get("switch"),
        "switch_step": summary.get("switch_step"),
        "switch_epoch": summary.get("switch_epoch"),
        "last_rho": summary.get("last_rho"),
        "budget": summary.get("budget"),
        "policy": summary.get("policy"),
        "curve": curve,
        # --eval-steps points: kNN against steps since the switch.
        "step_curve": summary.get("step_evaluations") or [],
        "since_switch": SINCE_SWITCH,  # how step_curve counts (switch_aggregate.steps_taken)
        "switch_transition": summary.get("switch_transition"),
        # The fit this invocation ran (a resumed run: its last part); the run's own wall time
        # over all its parts is metrics.wall_time.
        "run_seconds": None if seconds is None else round(seconds, 1),
        # CPU time of the fit process (None when only its record was missing): on a busy
        # machine the wall time overstates what the run needs, this does not.
        "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 1),
        "environment": environment,
    }


class _Study:
    def __init__(
        self,
        runs: list[RunSpec],
        out: Path,
        *,
        study: str,
        refuse_dirty: bool,
        python: str,
        environment: Callable[[], dict[str, Any]],
        on_record: Callable[[], None],
        log: Callable[[str], None],
    ) -> None:
        self.runs = {run.run_id: run for run in runs}
        self.study = study
        self.refuse_dirty = refuse_dirty
        self.out = out
        self.python = python
        self.environment = environment
        self.on_record = on_record
        self.log = log
        self.lock = threading.Lock()
        self.futures: dict[str, Future[None]] = {}
        self.children: set[subprocess.Popen[bytes]] = set()
        self.stopping = False

    def execute(self, run: RunSpec) -> None:
        if run.needs is not None and run.needs in self.futures:
            self.futures[run.needs].result()  # raises if the run it needs failed
        run_dir = self.out / "runs" / run.run_id
        start = time.perf_counter()
        cpu_seconds = None
        if not (run_dir / "summary.json").is_file():
            command = fit_command(self.python, run, run_dir)
            self.log(f"[{run.run_id}] start: {shlex.join(command[3:])}")
            log_path = self.out / "logs" / f"{run.run_id}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as log_file:
                code, cpu_seconds = self.run_child(command, log_file)
            if code != 0:
                raise RuntimeError(
                    f"{run.run_id}: rela-train fit exited with {code}; see {log_path}"
                )
        if not (run_dir / "summary.json").is_file():
            raise RuntimeError(f"{run.run_id}: stopped before its end; rerun to continue it")
        if run.is_pretrain:
            rgb_prior_checkpoint(run_dir, transported_checkpoint(self.out))
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        environment = self.environment()
        if self.refuse_dirty and environment.get("dirty"):
            raise RuntimeError(
                f"{run.run_id}: finished, but the tree has uncommitted changes now (diff sha256 "
                f"{environment.get('diff_sha256')}): its record is not written; commit them and "
                "rerun to write it, or pass --allow-dirty"
            )
        record = make_record(
            run,
            summary,
            study=self.study,
            # The run's own command (a resumed run ran `fit --resume` on the same settings).
            command=["python", "-m", "rela_train", "fit", *run.flags, "--out", str(run_dir)],
            environment=environment,
            seconds=None if cpu_seconds is None else time.perf_counter() - start,
            cpu_seconds=cpu_seconds,
        )
        with self.lock:
            write_record(self.out, record)
            self.on_record()
        switch = (
            f", switch at step {record['switch_step']}"
            if record["switch_step"] is not None
            else (", no switch" if run.prior else "")
        )
        knn = record["metrics"].get("knn_acc")
        took = record["run_seconds"]
        self.log(
            f"[{run.run_id}] done{'' if took is None else f' in {took:.0f} s'}: kNN "
            f"{'-' if knn is None else f'{100 * knn:.2f}%'}{switch}"
        )

    def run_child(self, command: list[str], log_file: Any) -> tuple[int, float]:
        """Run ``command`` to its end; its exit code and the CPU seconds it used (its own
        rusage, so runs side by side do not mix). The child has its own process group: a Ctrl-C
        reaches the study only, which then stops each running child once (see :meth:`stop`)."""
        with self.lock:
            if self.stopping:
                raise RuntimeError("the study is stopping")
            child = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_one_thread_env(),
                start_new_session=True,
            )
            self.children.add(child)
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            with self.lock:
                self.children.discard(child)
        child.returncode = os.waitstatus_to_exitcode(status)
        return child.returncode, usage.ru_utime + usage.ru_stime

    def stop(self) -> None:
        """Start nothing more; SIGTERM each running fit (it checkpoints after its step)."""
        with self.lock:
            self.stopping = True
            for child in self.children:
                child.send_signal(signal.SIGTERM)


def _one_thread_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    return env


def run_study(
    runs: list[RunSpec],
    out: Path,
    *,
    study: str,
    jobs: int,
    refuse_dirty: bool = False,
    python: str = sys.executable,
    environment: Callable[[], dict[str, Any]],
    on_record: Callable[[], None],
    log: Callable[[str], None],
) -> list[str]:
    """Run every run of ``runs`` that has no record yet, ``jobs`` at a time; returns the ids of
    the runs that failed (each failure is logged; the others go on). ``study`` names the study
    in every record; with ``refuse_dirty`` no record is written while the tree has uncommitted
    changes (the environment's ``dirty``)."""
    if jobs < 1:
        raise ValueError(f"--jobs: need at least 1, got {jobs}")
    finished = done_runs(out)
    study = _Study(
        runs,
        out,
        study=study,
        refuse_dirty=refuse_dirty,
        python=python,
        environment=environment,
        on_record=on_record,
        log=log,
    )
    todo = [run for run in runs if run.run_id not in finished]
    failed = []
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        # A run that needs another is submitted after it, so its wait never starves the pool.
        for run in todo:
            study.futures[run.run_id] = pool.submit(study.execute, run)
        for run_id, future in study.futures.items():
            error = future.exception()
            if error is not None:
                failed.append(run_id)
                log(f"[{run_id}] FAILED: {error}")
    except BaseException:
        # Ctrl-C or SIGTERM: start nothing new, stop the running fits at a checkpoint and wait
        # for them (a second Ctrl-C leaves them to finish that on their own); a rerun continues.
        study.stop()
        log("stopping: the running fits checkpoint and exit")
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return failed
