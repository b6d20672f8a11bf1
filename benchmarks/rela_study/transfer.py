"""The transfer part's report: does a prior from another distribution help, and how far apart are
the priors (``rela-train transportability``'s R^2 between their embeddings of the same images,
from the function behind that command)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rela_study.switch_aggregate import SwitchSummary, format_paired_markdown
from rela_train.prior.transportability import transportability

from rela_kernels.atomic_io import atomic_write_text

__all__ = ["R2_PRIORS", "transfer_markdown", "transportability_table"]

# The priors of the R^2 table, by the transfer rows' names.
R2_PRIORS = ("digits", "pixels", "fashion", "random")


def _store(out: Path, prior: str, seed: int) -> Path:
    """The store that the ``never`` run of ``prior`` at ``seed`` wrote (fit's RUN/prior)."""
    return out / "runs" / f"transfer-{prior}-never-seed{seed}" / "prior"


def transportability_table(out: Path, seed: int) -> dict[str, dict[str, float]]:
    """Held-out R^2 of the linear map from each prior's embeddings to each other's, on the
    training images of the runs at ``seed`` (``rela-train transportability``'s defaults: ridge
    1e-3, 20% held out). Pairs whose stores are not finished yet are left out; computed
    values are kept in ``OUT/transportability.json``."""
    cache_path = out / "transportability.json"
    cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    table: dict[str, dict[str, float]] = {}
    for a in R2_PRIORS:
        for b in R2_PRIORS:
            store_a, store_b = _store(out, a, seed), _store(out, b, seed)
            if a == b or not (store_a / "manifest.json").is_file():
                continue
            if not (store_b / "manifest.json").is_file():
                continue
            key = f"{a}->{b}@{seed}"
            if key not in cache:
                try:
                    cache[key] = transportability(store_a, store_b).r2
                except ValueError:
                    continue  # a store still being written; the next aggregation retries
                atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
            table.setdefault(a, {})[b] = cache[key]
    return table


def _r2_markdown(table: dict[str, dict[str, float]], seed: int) -> str:
    priors = [p for p in R2_PRIORS if p in table or any(p in row for row in table.values())]
    lines = [
        f"Transportability (held-out R^2 from the row's embeddings to the column's, on the "
        f"training images of seed {seed}'s runs):",
        "",
        "| from \\ to | " + " | ".join(priors) + " |",
        "|---" * (len(priors) + 1) + "|",
    ]
    for a in priors:
        cells = [f"{table[a][b]:.3f}" if b in table.get(a, {}) else "-" for b in priors]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transfer_markdown(summaries: list[SwitchSummary], out: Path) -> str:
    """The digits prior against the random-network and pixels priors, seed by seed, for each
    switch setting, and the R^2 table; empty before the transfer part has records."""
    rows = {s.row: s for s in summaries}
    parts = []
    for switch in ("never", "hard"):
        digits = f"transfer-digits-{switch}"
        for base in ("random", "pixels"):
            paired = format_paired_markdown(summaries, f"transfer-{base}-{switch}", [digits])
            if paired and digits in rows:
                parts.append(f"Digits prior against the {base} prior, {switch}:\n\n{paired}")
    seeds: list[Any] = sorted(
        {r["seed"] for s in summaries if s.row.startswith("transfer-") for r in s.records}
    )
    if seeds:
        table = transportability_table(out, seeds[0])
        if table:
            parts.append(_r2_markdown(table, seeds[0]))
    return "\n\n".join(parts)
