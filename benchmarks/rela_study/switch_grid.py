"""The runs of issue 18's switch study (benchmarks/study_switch.py): the same data, recipe and
sizes as issue 12's study (Fashion-MNIST 18k, 15 epochs, batch 32, official recipe, ReLA 50% with
the pixel prior), in four parts, in this order:

* ``factors`` -- ReLA 50% with each transition at the switch, one factor at a time (a: hard, as
  today; b: reset-target; c: warm-heads; d: keep-views; e: lr-drop; and the blend), with kNN on
  the fixed 5,000-image bank every 100 steps from 300 before the switch to 1,000 after it;
* ``horizon`` -- BYOL 100% and ReLA 50% that never switches at 15 epochs (ReLA 50% hard and with
  the best transition are factor rows);
* ``views`` (only when asked for) -- a diagnostic of ``keep-views``: BYOL on all data, switched
  to at step 0 of a ReLA run, on ReLA's views (``keep-views``) and, as the control, on BYOL's own
  (``hard``). It tells a better transition apart from milder views suiting this data;
* ``long`` -- the four horizon rows (BYOL 100%, ReLA 50% hard, best, never) at 3 x the epochs.

Each part runs every seed's runs before the next part starts, seed by seed, so the runs that
finish first are the first seed of every factor.
"""

from __future__ import annotations

from dataclasses import dataclass

from rela_study.grid import PIXELS, RunSpec, Sizes, _base_flags, _probe_flags

__all__ = [
    "DEFAULT_PARTS",
    "PARTS",
    "QUICK_STEPS",
    "STUDY_STEPS",
    "StepSizes",
    "SwitchRow",
    "build_switch_plan",
    "switch_rows",
]

PARTS = ("factors", "horizon", "views", "long")
# What a plain study runs: the views diagnostic only when asked for (--parts), so that the grid the
# issue asks for stays within its time budget.
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


# The window (100 steps, -300 .. +1000) at 281 steps per epoch; the transitions last
# about one epoch or two.
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
    return rows


def build_switch_plan(
    sizes: Sizes,
    steps: StepSizes,
    seeds: list[int],
    *,
    parts: tuple[str, ...] = DEFAULT_PARTS,
    long_seeds: list[int] | None = None,
    best: str,
    features: set[str],
    data_dir: str | None = None,
    switch: str | None = None,
) -> list[RunSpec]:
    """The runs of ``parts`` in execution order: part by part, seed by seed, rows in order.
    ``long_seeds`` (default: the first seed) are the long horizon's; ``switch`` replaces the
    adaptive rule (``--quick``: ``const:0.5``, so that the short runs switch)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: need distinct seeds, got {seeds}")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"--parts: unknown part(s) {', '.join(unknown)}; known: {PARTS}")
    long_seeds = long_seeds or seeds[:1]
    rows = switch_rows(steps, best)
    runs = []
    for part in PARTS:
        if part not in parts:
            continue
        for seed in long_seeds if part == "long" else seeds:
            for row in (r for r in rows if r.part == part):
                runs.append(_run(row, sizes, steps, seed, features, data_dir, switch))
    return runs


def _run(
    row: SwitchRow,
    sizes: Sizes,
    steps: StepSizes,
    seed: int,
    features: set[str],
    data_dir: str | None,
    switch: str | None,
) -> RunSpec:
    epochs = sizes.epochs * (LONG_FACTOR if row.long else 1)
    flags = _base_flags(sizes, seed, data_dir, features) + [
        "--train-subset", str(sizes.train_subset), "--epochs", str(epochs),
        "--eval-every", str(sizes.eval_every * (LONG_FACTOR if row.long else 1)),
        "--eval-bank", str(sizes.eval_bank), "--budget", f"{row.budget:g}",
        *_probe_flags(sizes, features),
    ]  # fmt: skip
    prior = None
    if row.prior:
        prior = PIXELS
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
    return RunSpec(
        row=row.name,
        label=row.label,
        core=True,
        seed=seed,
        flags=tuple(flags),
        samples=round(row.budget * sizes.train_subset) * epochs,
        prior=prior,
    )
