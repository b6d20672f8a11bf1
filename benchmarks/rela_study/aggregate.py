"""The studies' aggregation core: records grouped by row, per-row mean +- std over seeds
(:func:`summarize_rows`), and the bar panel and figure writing both studies' plots share; then
the ReLA study's own markdown table and plot (mean +- std over seeds, with error bars).

The std is the sample standard deviation (``ddof=1``) over a row's seeds; a row with one seed
has none (shown as ``-``).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rela_kernels.atomic_io import atomic_write

__all__ = [
    "RowSummary",
    "bar_panel",
    "curve_stats",
    "format_markdown",
    "group_rows",
    "mean_std",
    "new_figure",
    "plot_study",
    "save_figure",
    "summarize",
    "summarize_rows",
]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    if not values:
        raise ValueError("mean_std: no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class RowSummary:
    row: str
    label: str
    seeds: list[int]
    stats: dict[str, tuple[float, float | None]]  # name -> (mean, std) over the seeds
    switch_steps: list[int | None]
    records: list[dict[str, Any]]

    @property
    def metrics(self) -> dict[str, tuple[float, float | None]]:
        """:attr:`stats` of the ReLA study, whose values are the records' metrics."""
        return self.stats


def group_rows(
    records: list[dict[str, Any]], order: list[str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The records of each row, sorted by seed: rows named in ``order`` first, in that order,
    then the others in the order they first appear; rows without records are left out."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in order or []}
    for record in records:
        rows.setdefault(record["row"], []).append(record)
    return {
        name: sorted(group, key=lambda record: record["seed"])
        for name, group in rows.items()
        if group
    }


def summarize_rows(
    records: list[dict[str, Any]],
    values: Callable[[dict[str, Any]], dict[str, float]],
    order: list[str] | None = None,
) -> list[RowSummary]:
    """One summary per row (rows named in ``order`` first, in that order, then the others in
    the order they first appear): mean and std over the row's seeds of each of ``values(record)``
    that every seed of the row has (a mean over some seeds only would mislead)."""
    summaries = []
    for name, group in group_rows(records, order).items():
        per_key: dict[str, list[float]] = {}
        for record in group:
            for key, value in values(record).items():
                per_key.setdefault(key, []).append(float(value))
        summaries.append(
            RowSummary(
                row=name,
                label=group[0]["label"],
                seeds=[record["seed"] for record in group],
                stats={k: mean_std(v) for k, v in sorted(per_key.items()) if len(v) == len(group)},
                switch_steps=[record.get("switch_step") for record in group],
                records=group,
            )
        )
    return summaries


def summarize(records: list[dict[str, Any]], order: list[str] | None = None) -> list[RowSummary]:
    """The ReLA study's rows: every metric of the records (fractions, as recorded)."""
    return summarize_rows(
        records, lambda r: {k: v for k, v in r["metrics"].items() if v is not None}, order
    )


def _percent(stat: tuple[float, float | None] | None) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _number(stat: tuple[float, float | None] | None, scale: float = 1.0, digits: int = 0) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean * scale:,.{digits}f}" + ("" if std is None else f" ± {std * scale:,.{digits}f}")


def _switches(steps: list[int | None], has_prior: bool) -> str:
    if not has_prior:
        return "-"
    return ", ".join("none" if step is None else str(step) for step in steps)


def format_markdown(summaries: list[RowSummary]) -> str:
    """A markdown table: kNN and linear probe (%), samples seen, training time, switch steps."""
    probe = (
        "linear_acc_official"
        if any("linear_acc_official" in s.metrics for s in summaries)
        else "linear_acc"
    )
    probe_name = "official linear probe %" if probe == "linear_acc_official" else "L-BFGS probe %"
    header = [
        "row", "seeds", "kNN %", probe_name, "samples seen", "train min", "switch step(s)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        has_prior = any(record.get("prior") for record in s.records)
        cells = [
            s.label,
            str(len(s.seeds)),
            _percent(s.metrics.get("knn_acc")),
            _percent(s.metrics.get(probe)),
            _number(s.metrics.get("samples_seen")),
            _number(s.metrics.get("train_time"), 1 / 60, 1),
            _switches(s.switch_steps, has_prior),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_stats(records: list[dict[str, Any]], key: str) -> tuple[list[float], ...]:
    """Per evaluation point (matched by epoch): mean x, mean and std of kNN accuracy (%)."""
    by_epoch: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        for point in record.get("curve", []):
            if point.get("knn_acc") is not None:
                by_epoch.setdefault(point["epoch"], []).append(point)
    xs, ys, errors = [], [], []
    for epoch in sorted(by_epoch):
        points = by_epoch[epoch]
        if len(points) != len(records):
            continue
        xs.append(statistics.fmean(p[key] for p in points))
        mean, std = mean_std([100 * p["knn_acc"] for p in points])
        ys.append(mean)
        errors.append(0.0 if std is None else std)
    return xs, ys, errors


def new_figure(panels: int, width: float) -> tuple[Any, Any]:
    """A figure of ``panels`` side by side (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=(width, 6), constrained_layout=True)


def save_figure(figure: Any, out: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as a PNG at ``out`` (atomically) and close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    atomic_write(out, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
    return out


def bar_panel(
    axis: Any,
    summaries: list[RowSummary],
    bars: tuple[tuple[str, str], ...],
    *,
    scale: float = 1.0,
    margins: tuple[float, float] = (10.0, 5.0),
) -> None:
    """Each row's final accuracies as bars with error bars (± std over seeds): ``bars`` are
    (stat key, legend name) pairs, ``scale`` takes a stat to percent, the y range is the
    values widened by ``margins`` (below, above)."""
    positions = range(len(summaries))
    shown = []
    for offset, (key, name) in zip((-0.2, 0.2), bars, strict=True):
        means = [scale * s.stats[key][0] if key in s.stats else math.nan for s in summaries]
        errors = [scale * (s.stats[key][1] or 0.0) if key in s.stats else 0.0 for s in summaries]
        axis.bar([p + offset for p in positions], means, 0.4, yerr=errors, capsize=3, label=name)
        shown += [m for m in means if not math.isnan(m)]
    axis.set_xticks(list(positions), [s.row for s in summaries], rotation=60, ha="right")
    axis.set_ylabel("final top-1 accuracy (%), mean ± std over seeds")
    if shown:
        axis.set_ylim(max(0.0, min(shown) - margins[0]), min(100.0, max(shown) + margins[1]))
    axis.legend()


def plot_study(summaries: list[RowSummary], out: str | os.PathLike[str]) -> Path:
    """Three panels: the kNN curve (mean +- std over seeds) against samples seen and against
    training time, and each row's final kNN and linear probe with error bars."""
    import matplotlib.pyplot as plt

    figure, axes = new_figure(3, 18)
    colors = plt.cm.tab20.colors
    # Curves for the rows with several seeds (the core rows); bars for every row.
    curved = [s for s in summaries if len(s.seeds) > 1] or summaries
    for index, s in enumerate(curved):
        label = f"{s.label} (n={len(s.seeds)})"
        for axis, key in zip(axes[:2], ("samples_seen", "train_time"), strict=True):
            xs, ys, errors = curve_stats(s.records, key)
            if xs:
                axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label,
                              color=colors[index % len(colors)])  # fmt: skip
    probe = (
        "linear_acc_official"
        if any("linear_acc_official" in s.metrics for s in summaries)
        else "linear_acc"
    )
    bar_panel(axes[2], summaries, (("knn_acc", "kNN"), (probe, "linear probe")), scale=100)
    axes[0].set_xlabel("training samples seen")
    axes[1].set_xlabel("training wall time (s, one thread)")
    for axis in axes[:2]:
        axis.set_ylabel("kNN top-1 accuracy (%, per-epoch bank), mean ± std")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    return save_figure(figure, out)
