"""The runs of the switch study (benchmarks/study_switch.py): the same data, recipe and sizes as
the ReLA study (Fashion-MNIST 18k, 15 epochs, batch 32, official recipe, ReLA 50% with
the pixel prior), in four parts, in this order:

* ``factors`` -- ReLA 50% with each transition at the switch, one factor at a time (a: hard, the
  official code's; b: reset-target; c: warm-heads; d: keep-views; e: lr-drop; and the blend),
  with kNN on the fixed 5,000-image bank every 100 steps from 300 before the switch to 1,000
  after it;
* ``horizon`` -- BYOL 100% and ReLA 50% that never switches at 15 epochs (ReLA 50% hard and with
  the best transition are factor rows);
* ``views`` (only when asked for) -- a diagnostic of ``keep-views``: BYOL on all data, switched
  to at step 0 of a ReLA run, on ReLA's views (``keep-views``) and, as the control, on BYOL's own
  (``hard``). It tells a better transition apart from milder views suiting this data;
* ``long`` -- the four horizon rows (BYOL 100%, ReLA 50% hard, best, never) at 3 x the epochs;
* ``res28`` (only when asked for) -- full resolution: 28-px crops instead of 16, the official
  recipe as it stands (every parameter decayed): BYOL 100%, BYOL random 50%, and ReLA 50% never,
  hard and keep-views. The prior stays ``pixels:16`` so that only the crop size changes;
* ``res28long`` (only when asked for) -- the default rule's long half at 28 px: ReLA 50% hard and
  with the best transition at 3 x the epochs, at the long horizon's seeds;
* ``transfer`` (only when asked for) -- a prior from another distribution, at 16 px with the
  earlier parts' settings (``--decay-exclude bias-norm``, as every part but res28 and decay):
  ReLA 50% never and hard with the digits prior (``digits_prior.py``), a random network of the
  same architecture and the pixels prior; at the first seed also with a Fashion-MNIST-trained
  network (BYOL on classes 0-4, ``study_rela.py``'s prior), for the transportability table;
* ``decay`` (only when asked for) -- ReLA 50% hard at 16 px with the official recipe's own
  ``--decay-exclude none``, beside the factor row ``hard`` (which spares biases and norms).

Each part runs every seed's runs before the next part starts, seed by seed, so the runs that
finish first are the first seed of every factor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rela_study.grid import (
    PIXELS,
    PRIOR_ARCH,
    RECIPE_FLAGS,
    RunSpec,
    Sizes,
    base_flags,
    pretrain_run,
    probe_flags,
    random_checkpoint,
    transported_checkpoint,
)

__all__ = [
    "STUDY_NAME",
    "DEFAULT_PARTS",
    "LONG_PARTS",
    "PARTS",
    "QUICK_STEPS",
    "RES28_HARD_ROW",
    "RES28_LONG_BEST_ROW",
    "RES28_LONG_HARD_ROW",
    "SEED_MAJOR_PARTS",
    "STUDY_STEPS",
    "StepSizes",
    "SwitchRow",
    "build_switch_plan",
    "switch_rows",
]

# The name every record of this study carries.
STUDY_NAME = "rela-switch"

PARTS = ("factors", "horizon", "views", "long", "res28", "res28long", "transfer", "decay")
# The parts that run at 3 x the epochs, at the long horizon's seeds.
LONG_PARTS = ("long", "res28long")
# What a plain study runs: the diagnostic and the further parts only when asked for (--parts), so
# that the grid that decides the default transition fits a day of two CPU cores.
DEFAULT_PARTS = ("factors", "horizon", "long")
# The long horizon's epochs, as a multiple of the study's.
LONG_FACTOR = 3


@dataclass(frozen=True)
class StepSizes:
    """The step counts of the transitions and of the evaluation window."""

    eval_every: int  # kNN every this many steps ...
    before: int  # ... from this many steps before the switch ...
    after: int  # ... to this many after it
    warm: int  # warm-heads:STEPS
    lr_drop: int  # lr-drop:STEPS
    blend: int  # blend:STEPS


# Evaluations every 100 steps from 300 before the switch to 1,000 after it, at 281 steps per
# epoch: the drop and the recovery, while the transitions last about one epoch or two.
STUDY_STEPS = StepSizes(eval_every=100, before=300, after=1000, warm=300, lr_drop=300, blend=500)
# --quick: 31 steps per epoch, a constant switch at epoch 1 of 2.
QUICK_STEPS = StepSizes(eval_every=5, before=15, after=30, warm=5, lr_drop=5, blend=8)


@dataclass(frozen=True)
class SwitchRow:
    name: str
    label: str
    part: str
    budget: float
    prior: bool
    switch: str | None  # --switch (None: the trainer's adaptive default)
    transition: str | None  # --switch-transition
    long: bool = False  # the long horizon's epochs
    probe_switch: bool = False  # kNN every N steps around the switch
    prior_spec: str = PIXELS  # "{digits}", "{random}", "{fashion}": files of the study
    extra: tuple[str, ...] = ()  # further fit flags
    decay_exclude: str = "bias-norm"  # the earlier parts' setting (see grid.base_flags)
    first_seed_only: bool = False


def switch_rows(steps: StepSizes, best: str) -> list[SwitchRow]:
    """Every row; ``best`` is the transition of the "best" rows of the long horizon."""
    factors = [
        ("a-hard", "hard (today, official)", "hard"),
        ("b-reset-target", "reset-target", "reset-target"),
        ("c-warm-heads", f"warm-heads:{steps.warm}", f"warm-heads:{steps.warm}"),
        ("d-keep-views", "keep-views", "keep-views"),
        ("e-lr-drop", f"lr-drop:{steps.lr_drop}", f"lr-drop:{steps.lr_drop}"),
        ("f-blend", f"blend:{steps.blend}", f"blend:{steps.blend}"),
    ]
    rows = [
        SwitchRow(f"switch-{name}", f"ReLA 50%, {label}", "factors", 0.5, True, None, text,
                  probe_switch=True)
        for name, label, text in factors
    ]  # fmt: skip
    rows += [
        SwitchRow("byol-100", "BYOL, 100%", "horizon", 1.0, False, None, None),
        SwitchRow("rela-50-never", "ReLA 50%, never switches", "horizon", 0.5, True, "never",
                  None),
        SwitchRow("byol-100-rela-views", "BYOL 100% from step 0, ReLA's views", "views", 1.0,
                  True, "const:0", "keep-views"),
        SwitchRow("byol-100-byol-views", "BYOL 100% from step 0, BYOL's views (control)",
                  "views", 1.0, True, "const:0", "hard"),
        SwitchRow("long-byol-100", "BYOL, 100% (long)", "long", 1.0, False, None, None, True),
        SwitchRow("long-rela-50-hard", "ReLA 50%, hard (long)", "long", 0.5, True, None, "hard",
                  True, True),
        SwitchRow("long-rela-50-best", f"ReLA 50%, {best} (long)", "long", 0.5, True, None, best,
                  True, True),
        SwitchRow("long-rela-50-never", "ReLA 50%, never switches (long)", "long", 0.5, True,
                  "never", None, True),
    ]  # fmt: skip
    res28 = dict(extra=("--image-size", "28"), decay_exclude="none")
    rows += [
        SwitchRow("res28-byol-100", "28 px: BYOL, 100%", "res28", 1.0, False, None, None,
                  **res28),
        SwitchRow("res28-byol-random-50", "28 px: BYOL, random 50%", "res28", 0.5, False, None,
                  None, **res28),
        SwitchRow("res28-rela-50-never", "28 px: ReLA 50%, never switches", "res28", 0.5, True,
                  "never", None, **res28),
        SwitchRow(RES28_HARD_ROW, "28 px: ReLA 50%, hard", "res28", 0.5, True, None, "hard",
                  **res28),
        SwitchRow("res28-rela-50-keep-views", "28 px: ReLA 50%, keep-views", "res28", 0.5, True,
                  None, "keep-views", **res28),
        SwitchRow(RES28_LONG_HARD_ROW, "28 px: ReLA 50%, hard (long)", "res28long", 0.5, True,
                  None, "hard", True, **res28),
        SwitchRow(RES28_LONG_BEST_ROW, f"28 px: ReLA 50%, {best} (long)", "res28long", 0.5,
                  True, None, best, True, **res28),
    ]  # fmt: skip
    for prior, spec, label in TRANSFER_PRIORS:
        for switch, transition in (("never", None), (None, "hard")):
            if prior == "fashion" and transition is not None:
                continue  # the in-distribution prior is there for the R^2 table
            name = f"transfer-{prior}-{switch or transition}"
            rows.append(SwitchRow(
                name, f"ReLA 50%, {label}, {switch or transition}", "transfer", 0.5, True,
                switch, transition, prior_spec=spec,
                first_seed_only=prior == "fashion",
            ))  # fmt: skip
    rows.append(
        SwitchRow(
            "decay-rela-50-hard",
            "ReLA 50%, hard, every parameter decayed",
            "decay",
            0.5,
            True,
            None,
            "hard",
            decay_exclude="none",
            first_seed_only=True,
        )
    )
    return rows


RES28_HARD_ROW = "res28-rela-50-hard"
RES28_LONG_HARD_ROW = "res28long-rela-50-hard"
RES28_LONG_BEST_ROW = "res28long-rela-50-best"
SEED_MAJOR_PARTS = ("res28", "res28long", "transfer", "decay")
# The parts at 28-px crops.
RES28_PARTS = ("res28", "res28long")
# A 28-px sample costs about twice a 16-px one (one epoch of 3,000 images, one thread, BYOL:
# 20.4 s against 9.9 s of training on the study's CPU).
RES28_RELATIVE_COST = 2.06
# The transfer part's priors: name, --prior spec (files filled in per study and seed), label.
TRANSFER_PRIORS = (
    ("digits", "checkpoint:resnet10:{digits}", "digits prior (supervised, sklearn digits)"),
    ("random", "checkpoint:resnet10:{random}", "random-network prior"),
    ("pixels", PIXELS, "pixels prior"),
    ("fashion", "checkpoint:resnet10:{fashion}", "Fashion-MNIST prior (BYOL, classes 0-4)"),
)


def digits_checkpoint(out: Path) -> Path:
    """Where the digits prior's backbone is written (``digits_prior.train_digits_prior``)."""
    return out / "priors" / f"digits-{PRIOR_ARCH}.pt"


def build_switch_plan(
    sizes: Sizes,
    steps: StepSizes,
    seeds: list[int],
    *,
    parts: tuple[str, ...] = DEFAULT_PARTS,
    long_seeds: list[int] | None = None,
    best: str,
    features: frozenset[str] = RECIPE_FLAGS,
    data_dir: str | None = None,
    switch: str | None = None,
    out: Path | None = None,
) -> list[RunSpec]:
    """The runs of ``parts`` in execution order: part by part, seed by seed, rows in order.
    ``long_seeds`` (default: the first seed) are the long horizon's; ``switch`` replaces the
    adaptive rule (``--quick``: ``const:0.5``, so that the short runs switch). The transfer part
    needs ``out`` (where its prior files are) and starts with the Fashion-MNIST prior's
    training, which its ``fashion`` row waits for."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: need distinct seeds, got {seeds}")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"--parts: unknown part(s) {', '.join(unknown)}; known: {PARTS}")
    long_seeds = long_seeds or seeds[:1]
    rows = switch_rows(steps, best)
    runs = []
    pretrain = None
    if "transfer" in parts:
        if out is None:
            raise ValueError("the transfer part needs the study directory (out)")
        pretrain = pretrain_run(out, sizes, seeds[0], features)
        runs.append(pretrain)
    for part in PARTS:
        if part not in parts:
            continue
        for seed in long_seeds if part in LONG_PARTS else seeds:
            for row in (r for r in rows if r.part == part):
                if row.first_seed_only and seed != seeds[0]:
                    continue
                # The transfer part's prior files (only its specs have placeholders).
                files = {} if out is None else {
                    "digits": digits_checkpoint(out),
                    "random": random_checkpoint(out, seed),
                    "fashion": transported_checkpoint(out),
                }  # fmt: skip
                run = _run(row, sizes, steps, seed, features, data_dir, switch, files)
                if "{fashion}" in row.prior_spec and pretrain is not None:
                    run = replace(run, needs=pretrain.run_id)
                runs.append(run)
    # The later parts run seed by seed across parts, so that a seed's runs (which share the
    # machine, for paired differences) finish together and early seeds give every row first.
    part_of = {row.name: row.part for row in rows}
    head = [run for run in runs if part_of.get(run.row) not in SEED_MAJOR_PARTS]
    tail = [run for run in runs if part_of.get(run.row) in SEED_MAJOR_PARTS]
    return head + sorted(tail, key=lambda run: seeds.index(run.seed))


def _run(
    row: SwitchRow,
    sizes: Sizes,
    steps: StepSizes,
    seed: int,
    features: set[str],
    data_dir: str | None,
    switch: str | None,
    files: dict[str, Path] | None = None,
) -> RunSpec:
    epochs = sizes.epochs * (LONG_FACTOR if row.long else 1)
    flags = base_flags(sizes, seed, data_dir, features, row.decay_exclude) + [
        "--train-subset", str(sizes.train_subset), "--epochs", str(epochs),
        "--eval-every", str(sizes.eval_every * (LONG_FACTOR if row.long else 1)),
        "--eval-bank", str(sizes.eval_bank), "--budget", f"{row.budget:g}",
        *probe_flags(sizes, features),
    ]  # fmt: skip
    prior = None
    if row.prior:
        prior = row.prior_spec.format(**(files or {}))
        flags += ["--prior", prior, "--rela-head", "frozen", "--selection", "random"]
        chosen = row.switch or switch
        if chosen is not None:
            flags += ["--switch", chosen]
        if row.transition is not None:
            flags += ["--switch-transition", row.transition]
        if row.probe_switch:
            flags += [
                "--eval-steps", str(steps.eval_every),
                "--eval-steps-window", f"{steps.before}:{steps.after}",
            ]  # fmt: skip
    elif row.budget < 1:
        flags += ["--selection", "random"]
    flags += list(row.extra)
    return RunSpec(
        row=row.name,
        label=row.label,
        core=True,
        seed=seed,
        flags=tuple(flags),
        samples=round(row.budget * sizes.train_subset) * epochs,
        prior=prior,
        relative_cost=RES28_RELATIVE_COST if row.part in RES28_PARTS else 1.0,
    )
