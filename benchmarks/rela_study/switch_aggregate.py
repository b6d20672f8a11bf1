"""The switch study, aggregated: per run the drop around the switch, per row mean +- std
over seeds, a markdown table, the rule for changing the default transition, and a plot of kNN
against the steps since the switch with bands over seeds.

The *drop* of a run is the peak kNN at or before the switch minus the lowest kNN after it, both
from the ``--eval-steps`` points (``step_curve`` of the record, on the fixed per-epoch bank). A
step curve point's ``since_switch`` follows the trainer's convention (0: the first BYOL step, -1:
the state the ReLA phase ended with) in records stamped with it
(``rela_train.step_evals.SINCE_SWITCH``); older records counted the BYOL-phase steps taken (0:
the state at the switch). :func:`steps_taken` reads both. Points from runs whose switch steps
differ are put on a common axis: the snapshots before the switch fall between multiples of the
evaluation interval and are plotted at the multiple at or below them.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

from rela_study.aggregate import (
    RowSummary,
    bar_panel,
    mean_std,
    new_figure,
    save_figure,
    summarize_rows,
)
from rela_train.step_evals import SINCE_SWITCH

__all__ = [
    "SwitchSummary",
    "default_verdict",
    "format_paired_markdown",
    "format_switch_markdown",
    "plot_switch",
    "run_drop",
    "steps_taken",
    "summarize_switch",
]


def steps_taken(record: dict[str, Any], point: dict[str, Any]) -> int:
    """The BYOL-phase steps taken at a step curve point of ``record`` (0: the state at the
    switch), whichever ``since_switch`` convention the record was written with."""
    shift = 1 if record.get("since_switch") == SINCE_SWITCH else 0
    return int(point["since_switch"]) + shift


def run_drop(record: dict[str, Any]) -> dict[str, float] | None:
    """``{"peak", "low", "drop"}`` (kNN %) of one run, or None without points on both sides."""
    curve = [p for p in record.get("step_curve") or [] if p.get("knn_acc") is not None]
    before = [100 * p["knn_acc"] for p in curve if steps_taken(record, p) <= 0]
    after = [100 * p["knn_acc"] for p in curve if steps_taken(record, p) > 0]
    if not before or not after:
        return None
    peak, low = max(before), min(after)
    return {"peak": peak, "low": low, "drop": peak - low}


SwitchSummary = RowSummary  # stats in kNN %: knn, probe, and peak, low, drop where measured


def _switch_values(record: dict[str, Any]) -> dict[str, float]:
    metrics = record["metrics"]
    values = {
        out: 100 * metrics[key]
        for key, out in (("knn_acc", "knn"), ("linear_acc_official", "probe"))
        if metrics.get(key) is not None
    }
    return {**values, **(run_drop(record) or {})}


def summarize_switch(
    records: list[dict[str, Any]], order: list[str] | None = None
) -> list[SwitchSummary]:
    """One summary per row (rows in ``order`` first): final kNN and official probe, and the
    peak, low and drop around the switch where every seed of the row has them."""
    return summarize_rows(records, _switch_values, order)


def _cell(stat: tuple[float, float | None] | None) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def format_switch_markdown(summaries: list[SwitchSummary]) -> str:
    """Rows: seeds, peak before the switch, lowest after, drop, final kNN, official probe,
    switch steps (kNN in %; mean ± sample std over seeds, no std for one seed)."""
    header = ["row", "seeds", "peak before", "lowest after", "drop", "final kNN",
              "official probe", "switch step(s)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        steps = ", ".join("none" if x is None else str(x) for x in s.switch_steps)
        has_prior = any(record.get("prior") for record in s.records)
        cells = [
            s.label, ",".join(map(str, s.seeds)), _cell(s.stats.get("peak")),
            _cell(s.stats.get("low")), _cell(s.stats.get("drop")), _cell(s.stats.get("knn")),
            _cell(s.stats.get("probe")), steps if has_prior else "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_paired_markdown(summaries: list[SwitchSummary], base: str, rows: list[str]) -> str:
    """Each of ``rows`` against ``base`` seed by seed: the differences in final kNN and in the
    drop at the seeds both have (mean ± sample std over those seeds, in kNN points). A seed's
    runs share the ReLA phase and the machine, so the differences are free of the seed-to-seed
    spread that the per-row stds carry. Empty without ``base``."""
    by_row = {s.row: s for s in summaries}
    if base not in by_row:
        return ""
    base_runs = {record["seed"]: record for record in by_row[base].records}
    lines = [
        f"| row | seeds | final kNN - {base}'s | drop - {base}'s |",
        "|---|---|---|---|",
    ]
    for name in rows:
        if name not in by_row:
            continue
        pairs = [(r, base_runs[r["seed"]]) for r in by_row[name].records if r["seed"] in base_runs]
        if not pairs:
            continue
        knn = [100 * (a["metrics"]["knn_acc"] - b["metrics"]["knn_acc"]) for a, b in pairs]
        drop_pairs = [(run_drop(a), run_drop(b)) for a, b in pairs]
        drop = [a["drop"] - b["drop"] for a, b in drop_pairs if a and b]
        cells = [
            by_row[name].label,
            ",".join(str(a["seed"]) for a, _ in pairs),
            _cell(mean_std(knn)),
            _cell(mean_std(drop)) if len(drop) == len(pairs) else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_verdict(
    summaries: list[SwitchSummary], hard: str, candidates: list[str], long_pairs: dict[str, str]
) -> str:
    """The rule for the default outside ``--recipe official`` (docs/switch.md, "The default"):
    a transition replaces ``hard`` only if, at 3 or more seeds, its final kNN beats hard's by
    more than the larger of the two seed stds at the study's epochs, and it is not worse at the
    long horizon (``long_pairs``: candidate row -> its long row, plus ``hard`` -> hard's long
    row)."""
    by_row = {s.row: s for s in summaries}
    base = by_row.get(hard)
    if base is None or len(base.seeds) < 3 or "knn" not in base.stats:
        have = 0 if base is None else len(base.seeds)
        return f"no verdict: {hard} has {have} seed(s), the rule needs 3"
    lines = []
    winners = []
    for name in candidates:
        s = by_row.get(name)
        if s is None or len(s.seeds) < 3 or "knn" not in s.stats:
            lines.append(f"{name}: {0 if s is None else len(s.seeds)} seed(s), needs 3")
            continue
        gain = s.stats["knn"][0] - base.stats["knn"][0]
        spread = max(s.stats["knn"][1] or 0.0, base.stats["knn"][1] or 0.0)
        ok = gain > spread
        note = f"{name}: {gain:+.2f} kNN points vs {hard} (seed std {spread:.2f})"
        if ok:
            long_row, long_hard = (
                by_row.get(long_pairs.get(name, "")),
                by_row.get(long_pairs.get(hard, "")),
            )
            if long_row is None or long_hard is None:
                note += "; long horizon not measured"
                ok = False
            elif long_row.stats["knn"][0] < long_hard.stats["knn"][0]:
                note += "; worse at the long horizon"
                ok = False
        lines.append(note + ("; MEETS the rule" if ok else ""))
        if ok:
            winners.append((gain, name))
    chosen = by_row[max(winners)[1]] if winners else base
    verdict = f"the default is {_transition(chosen)}"
    return "; ".join(lines) + f". Verdict: {verdict}"


def _transition(summary: SwitchSummary) -> str:
    """The transition a row's runs used, with the row (the row alone where records lack it)."""
    used = {record.get("switch_transition") for record in summary.records} - {None}
    return f"{used.pop()} ({summary.row})" if len(used) == 1 else summary.row


def _offset(since: int, every: int) -> int:
    """The plot's x of a point: after the switch the points lie on multiples of ``every``;
    a snapshot before it goes to the multiple at or below it (never onto offset 0)."""
    if since >= 0:
        return every * round(since / every)
    return -every * math.ceil(-since / every)


def _binned(records: list[dict[str, Any]], every: int) -> tuple[list[float], ...]:
    """Mean and std of kNN (%) over seeds per rounded offset, where every seed has a point."""
    per_offset: dict[int, list[float]] = {}
    for record in records:
        seen: dict[int, float] = {}
        for point in record.get("step_curve") or []:
            if point.get("knn_acc") is None or point.get("since_switch") is None:
                continue
            offset = _offset(steps_taken(record, point), every)
            seen[offset] = 100 * point["knn_acc"]
        for offset, value in seen.items():
            per_offset.setdefault(offset, []).append(value)
    xs, ys, errors = [], [], []
    for offset in sorted(per_offset):
        values = per_offset[offset]
        if len(values) != len(records):
            continue
        xs.append(float(offset))
        ys.append(statistics.fmean(values))
        errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return xs, ys, errors


def plot_switch(summaries: list[SwitchSummary], out: str | os.PathLike[str], every: int) -> Path:
    """Left: kNN against steps since the switch (mean, band = ± std over seeds) for each row
    with a step curve. Right: final kNN and official probe per row with error bars. Without any
    step curve, the right panel alone."""
    import matplotlib.pyplot as plt

    bars = (("knn", "final kNN"), ("probe", "official probe"))
    curved = [s for s in summaries if any(r.get("step_curve") for r in s.records)]
    if not curved:  # parts without evaluations around the switch: the accuracies alone
        figure, axis = new_figure(1, 10)
        bar_panel(axis, summaries, bars, margins=(8.0, 4.0))
        return save_figure(figure, out)
    figure, axes = new_figure(2, 16)
    colors = plt.cm.tab10.colors
    for index, s in enumerate(curved):
        xs, ys, errors = _binned(s.records, every)
        if not xs:
            continue
        color = colors[index % len(colors)]
        axes[0].plot(xs, ys, marker="o", ms=3, color=color, label=f"{s.label} (n={len(s.seeds)})")
        low = [y - e for y, e in zip(ys, errors, strict=True)]
        high = [y + e for y, e in zip(ys, errors, strict=True)]
        axes[0].fill_between(xs, low, high, color=color, alpha=0.15)
    axes[0].axvline(0, color="gray", lw=1, ls="--")
    axes[0].set_xlabel("optimizer steps since the ReLA -> BYOL switch")
    axes[0].set_ylabel("kNN top-1 (%, 5,000-image bank), mean ± std over seeds")
    axes[0].grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8, loc="lower right")
    bar_panel(axes[1], summaries, bars, margins=(8.0, 4.0))
    return save_figure(figure, out)
