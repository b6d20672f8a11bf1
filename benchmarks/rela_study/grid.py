"""Which runs make up the study, the ``rela-train fit`` flags of each, and what each costs.

A *row* is one training setting (BYOL on all data, ReLA at 50% with the pixel prior, ...); a
*run* is a row at one seed. Core rows run at every seed; ablation rows at the first seed only.
One extra run trains the network behind the transported prior (BYOL on classes 0-4 only); the
runs that use that prior wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "STUDY_NAME",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "RECIPE_FLAGS",
    "RunSpec",
    "Sizes",
    "build_plan",
    "estimate_seconds",
    "base_flags",
    "format_plan",
    "pretrain_run",
    "probe_flags",
    "with_overrides",
]

# The name every record of this study carries.
STUDY_NAME = "rela-fashion-mnist"

PRETRAIN_ROW = "transported-prior-pretrain"
# The transported prior is trained on these Fashion-MNIST classes (T-shirt, Trouser, Pullover,
# Dress, Coat); the study's runs train on all ten.
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
PIXELS = "pixels:16"
# The networks behind the transported and the random prior. Twice the trained backbone's width:
# the official recipe's target width is min(backbone width 128, prior width), and a prior only
# 128 wide can have fewer than 128 non-degenerate principal components (a random ResNet's do).
PRIOR_ARCH, PRIOR_WIDTH = "resnet10", 32


@dataclass(frozen=True)
class Sizes:
    """Data and schedule sizes shared by every run of one study."""

    train_subset: int  # training images (a fixed subset, the same for every run)
    val_subset: int  # test images for kNN and the linear probe
    batch_size: int
    epochs: int
    eval_every: int  # per-epoch kNN curve: every this many epochs
    eval_bank: int  # training images in the per-epoch kNN bank
    probe_epochs: int  # final linear probe
    pretrain_subset: int  # images of classes 0-4 behind the transported prior
    pretrain_epochs: int
    # The checkpoint prior embeds at the small-image ResNets' 32 px, so its network trains there.
    pretrain_image_size: int = 32


# Sized from measured per-epoch times so that the default grid fits in 90 minutes with two
# single-thread runs side by side, and the ReLA runs at 50% take enough optimizer steps for the
# adaptive switch to fire well before the end (see docs/study.md).
DEFAULT_SIZES = Sizes(
    train_subset=18000,
    val_subset=5000,
    batch_size=32,
    epochs=15,
    eval_every=3,
    eval_bank=5000,
    probe_epochs=100,
    pretrain_subset=8000,
    pretrain_epochs=4,
)
# A smoke run of the whole machinery (every row at one seed) in a few minutes; too short for the
# adaptive switch to fire or for the accuracies to mean anything.
QUICK_SIZES = replace(
    DEFAULT_SIZES, train_subset=2000, val_subset=1000, epochs=2, eval_every=1, eval_bank=1000,
    probe_epochs=10, pretrain_subset=1000, pretrain_epochs=1,
)  # fmt: skip


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    core: bool  # every seed (else: the first seed only)
    budget: float = 1.0
    prior: str | None = None  # a spec; "{seed}" and "{transported}" are filled in per run
    extra: tuple[str, ...] = ()


ROWS = (
    Row("byol-100", "BYOL, 100%", True),
    Row("byol-random-50", "BYOL, random 50% per epoch", True, budget=0.5),
    Row("rela-50-pixels", "ReLA 50%, pixel prior", True, 0.5, PIXELS),
    Row("rela-50-random", "ReLA 50%, random-network prior", True, 0.5,
        "checkpoint:resnet10:{random}"),
    Row(
        "rela-50-transported",
        "ReLA 50%, transported prior (BYOL on classes 0-4)",
        True,
        0.5,
        "checkpoint:resnet10:{transported}",
    ),
    Row("rela-10-pixels", "ReLA 10%, pixel prior", False, 0.1, PIXELS),
    Row("rela-20-pixels", "ReLA 20%, pixel prior", False, 0.2, PIXELS),
    Row("rela-50-pixels-infobatch", "ReLA 50%, pixels, InfoBatch", False, 0.5, PIXELS,
        ("--selection", "infobatch")),
    Row("rela-50-pixels-hard", "ReLA 50%, pixels, hardest", False, 0.5, PIXELS,
        ("--selection", "hard")),
    Row("rela-50-pixels-easy", "ReLA 50%, pixels, easiest", False, 0.5, PIXELS,
        ("--selection", "easy")),
    Row("rela-50-pixels-trainable-head", "ReLA 50%, pixels, trainable head", False, 0.5, PIXELS,
        ("--rela-head", "trainable")),
    Row("rela-50-pixels-const", "ReLA 50%, pixels, switch const:0.3", False, 0.5, PIXELS,
        ("--switch", "const:0.3")),
)  # fmt: skip
ROW_ORDER = [row.name for row in ROWS]


@dataclass(frozen=True)
class RunSpec:
    """One ``rela-train fit`` of the study."""

    row: str
    label: str
    core: bool
    seed: int
    flags: tuple[str, ...]  # every fit flag but --out
    samples: int  # training samples it will see (for the time estimate)
    prior: str | None = None
    needs: str | None = None  # run id of the run whose output it uses
    relative_cost: float = 1.0  # training cost per sample against the 16-px runs'

    @property
    def run_id(self) -> str:
        return f"{self.row}-seed{self.seed}"

    @property
    def is_pretrain(self) -> bool:
        return self.row == PRETRAIN_ROW


def transported_checkpoint(out: Path) -> Path:
    """Where the transported prior's RGB checkpoint is written."""
    return out / "priors" / "transported-resnet10.pt"


def random_checkpoint(out: Path, seed: int) -> Path:
    """Where the random prior network of ``seed`` is written."""
    return out / "priors" / f"random-resnet10-seed{seed}.pt"


def pretrain_data_dir(out: Path) -> Path:
    """Where the classes-0-4 copy of Fashion-MNIST is written."""
    return out / "data" / "fashion-mnist-classes-0-4"


# The official recipe's flags the runs give (a plan without them uses the trainer's defaults).
RECIPE_FLAGS = frozenset({"--recipe", "--probe"})


def base_flags(
    sizes: Sizes,
    seed: int,
    data_dir: str | None,
    features: set[str],
    decay_exclude: str = "bias-norm",
) -> list[str]:
    """The flags every run shares. ``decay_exclude``: the studies measured before the official
    recipe decayed every parameter spare biases and norms, so their runs stay reproducible."""
    flags = [
        "--preset", "fashion-mnist-demo", "--threads", "1", "--no-progress",
        "--val-subset", str(sizes.val_subset), "--batch-size", str(sizes.batch_size),
        "--seed", str(seed),
    ]  # fmt: skip
    if data_dir is not None:
        flags += ["--data-dir", data_dir]
    if "--recipe" in features:
        flags += ["--recipe", "official", "--decay-exclude", decay_exclude]
    return flags


def probe_flags(sizes: Sizes, features: set[str]) -> list[str]:
    if "--probe" in features:
        return ["--probe", "official", "--probe-epochs", str(sizes.probe_epochs)]
    # A trainer without the official probe: its L-BFGS probe stands in.
    return ["--probe-epochs", str(sizes.probe_epochs)]


def pretrain_run(out: Path, sizes: Sizes, seed: int, features: set[str]) -> RunSpec:
    """The training of the transported prior's network: BYOL on the classes-0-4 copy of
    Fashion-MNIST (``transport.write_class_subset`` writes it to ``pretrain_data_dir(out)``)."""
    return RunSpec(
        row=PRETRAIN_ROW,
        label="BYOL on classes 0-4 (the transported prior's network)",
        core=False,
        seed=seed,
        flags=(
            *base_flags(sizes, seed, str(pretrain_data_dir(out)), features),
            *("--train-subset", str(sizes.pretrain_subset)),
            *("--epochs", str(sizes.pretrain_epochs)),
            *("--image-size", str(sizes.pretrain_image_size)),
            *("--arch", PRIOR_ARCH, "--width", str(PRIOR_WIDTH)),
            *("--eval-every", "0", "--eval-bank", str(sizes.eval_bank), "--probe-epochs", "0"),
        ),
        samples=sizes.pretrain_subset * sizes.pretrain_epochs,
    )


def build_plan(
    out: Path,
    sizes: Sizes,
    seeds: list[int],
    *,
    features: frozenset[str] = RECIPE_FLAGS,
    data_dir: str | None = None,
) -> list[RunSpec]:
    """Every run of the study in execution order: the transported prior's training first (its
    users wait for it), then each seed's runs, most expensive first so that the two workers end
    together.

    ``features``: which of the official recipe's flags (``--recipe``, ``--probe``) the runs
    give (default: both); without them the runs use the trainer's defaults.
    """
    if not seeds:
        raise ValueError("--seeds: need at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: each seed once, got {seeds}")
    if sizes.epochs < 1:
        raise ValueError(f"--epochs: need at least 1, got {sizes.epochs}")
    pretrain = pretrain_run(out, sizes, seeds[0], features)
    runs = []
    for index, seed in enumerate(seeds):
        for row in ROWS:
            if not row.core and index > 0:
                continue
            flags = base_flags(sizes, seed, data_dir, features) + [
                "--train-subset", str(sizes.train_subset), "--epochs", str(sizes.epochs),
                "--eval-every", str(sizes.eval_every), "--eval-bank", str(sizes.eval_bank),
                "--budget", f"{row.budget:g}",
            ]  # fmt: skip
            flags += probe_flags(sizes, features)
            prior = None
            if row.prior is not None:
                prior = row.prior.format(
                    transported=transported_checkpoint(out), random=random_checkpoint(out, seed)
                )
                flags += ["--prior", prior]
                if "--rela-head" not in row.extra:
                    # The official (and, with the official recipe, default) frozen head, named
                    # so that a trainer with another default runs the same method.
                    flags += ["--rela-head", "frozen"]
            if row.budget < 1 and "--selection" not in row.extra:
                flags += ["--selection", "random"]
            flags += list(row.extra)
            runs.append(
                RunSpec(
                    row=row.name,
                    label=row.label,
                    core=row.core,
                    seed=seed,
                    flags=tuple(flags),
                    samples=round(row.budget * sizes.train_subset) * sizes.epochs,
                    prior=prior,
                    needs=pretrain.run_id if "{transported}" in (row.prior or "") else None,
                )
            )
    # Users of the transported prior go last: by then its training has long finished.
    runs.sort(key=lambda run: (run.needs is not None, -run.samples))
    return [pretrain, *runs]


# CPU seconds per training sample of one single-thread run at 16 px, batch 32, official recipe
# (the demo's ResNet-10 width 16; a ReLA run at 50% is about half ReLA phase, half BYOL phase),
# the cost of a sample of the transported prior's training (width 32 at 32 px) relative to
# that, the fixed cost of a run (start-up, per-epoch kNN, final kNN and linear probe) and of
# embedding the training images with a network prior (width 32 at 32 px), measured on the
# 2-core CPU VM; see docs/study.md. A busy machine stretches the wall time.
SECONDS_PER_SAMPLE = {"byol": 1.5e-3, "rela": 1.25e-3}
PRETRAIN_RELATIVE_COST = 8.0
SECONDS_PER_RUN = 40.0
SECONDS_NETWORK_PRIOR = 50.0


def estimate_seconds(run: RunSpec) -> float:
    """Rough single-thread wall time of one run (training, prior embedding, evaluation)."""
    rate = SECONDS_PER_SAMPLE["rela" if run.prior else "byol"]
    relative = PRETRAIN_RELATIVE_COST if run.is_pretrain else run.relative_cost
    seconds = run.samples * rate * relative + SECONDS_PER_RUN
    if run.prior is not None and run.prior.startswith("checkpoint:"):
        seconds += SECONDS_NETWORK_PRIOR
    return seconds


def format_plan(
    runs: list[RunSpec], sizes: Sizes, jobs: int, done: set[str], *, title: str = "ReLA study"
) -> str:
    """The plan of the study called ``title``: rows x seeds, each row's estimated time, and the
    whole study's."""
    rows: dict[str, list[RunSpec]] = {}
    for run in runs:
        rows.setdefault(run.row, []).append(run)
    lines = [
        f"{title}: Fashion-MNIST, {sizes.train_subset} training images, {sizes.val_subset} "
        f"test images, {sizes.epochs} epochs, batch {sizes.batch_size}; {len(runs)} runs, "
        f"{jobs} at a time, 1 thread each",
        f"{'row':34} {'seeds':>12} {'est. min/run':>12} {'done':>5}",
    ]
    total = 0.0
    for name, group in rows.items():
        per_run = estimate_seconds(group[0])
        left = [run for run in group if run.run_id not in done]
        total += sum(estimate_seconds(run) for run in left)
        seeds = ",".join(str(run.seed) for run in group)
        finished = len(group) - len(left)
        lines.append(f"{name:34} {seeds:>12} {per_run / 60:>12.1f} {finished:>2}/{len(group)}")
    lines.append(
        f"estimated time left: {total / 60 / max(1, jobs):.0f} min ({total / 60:.0f} min of "
        f"single-thread runs over {jobs} workers)"
    )
    return "\n".join(lines)


def with_overrides(sizes: Sizes, epochs: int | None) -> Sizes:
    """``sizes`` with the command line's ``--epochs`` applied."""
    return sizes if epochs is None else replace(sizes, epochs=epochs)
