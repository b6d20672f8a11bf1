"""Where a run came from: the preset it started from, its data's fingerprint, the code's git sha.

Kept in every checkpoint (``provenance``), so an exported backbone can say which run, data and
code made it (:mod:`rela_train.export`).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["code_version", "run_provenance"]

_PACKAGE = Path(__file__).resolve().parent


@functools.cache
def code_version() -> str | None:
    """The git sha of the source checkout this package runs from (``-dirty`` when tracked files
    differ from it), or None where it is not run from a git checkout (an installed wheel)."""
    try:
        top = _git("rev-parse", "--show-toplevel")
        if top is None or _PACKAGE != Path(top).resolve() / "python" / "rela_train":
            return None  # some other repository around an installed copy
        sha = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return None
    if sha is None:
        return None
    return sha + ("-dirty" if dirty else "")


def _git(*args: str) -> str | None:
    done = subprocess.run(
        ["git", *args], cwd=_PACKAGE, capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else None


def run_provenance(
    preset: str | None, data_fingerprint: str, saved: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A run's provenance: ``saved`` (a resumed run's, from its checkpoint) is kept, and the
    code a resumption runs is added when it differs from the code that started the run."""
    current = code_version()
    if saved is None:
        return {"preset": preset, "data_fingerprint": data_fingerprint, "git_sha": current}
    out = dict(saved)
    if current != saved.get("git_sha"):
        out["resumed_git_sha"] = current
    return out
