"""The layout's rules: every trainer module imports on its own (no import cycle), nothing outside
``rela_kernels`` imports its private modules, benchmarks use the trainer's public API only, and
the command line reads a plain list of commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINER = sorted(
    ".".join(p.relative_to(ROOT / "python").with_suffix("").parts)
    for p in (ROOT / "python" / "rela_train").rglob("*.py")
    if p.name != "__main__.py"
)


# Imports each module first (the trainer's modules forgotten in between): an import cycle
# through a module fails when that module is the first one imported.
_IMPORT_EACH_FIRST = """
import importlib, sys
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] == "rela_train"]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as error:
        sys.exit(f"import {name} first: {error}")
"""


def test_each_trainer_module_imports_first() -> None:
    modules = [m.removesuffix(".__init__") for m in TRAINER]
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_FIRST, *reversed(modules)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (ROOT / folder).rglob("*.py")]


def test_no_private_engine_module_is_imported_outside_the_engine() -> None:
    private = re.compile(r"^\s*(from|import)\s+rela_kernels\._", re.MULTILINE)
    offenders = [str(p) for p in _sources("python", "benchmarks") if private.search(p.read_text())]
    assert offenders == []


def test_benchmarks_use_public_trainer_names() -> None:
    private = re.compile(r"\btrainer\._[a-z]")
    offenders = [str(p) for p in _sources("benchmarks") if private.search(p.read_text())]
    assert offenders == []


def test_the_cli_reads_a_plain_list_of_commands() -> None:
    from rela_train import cli
    from rela_train.commands import COMMANDS

    names = [command.name for command in COMMANDS]
    assert names == ["embed", "transportability", "fit", "eval", "export", "report", "demo"]
    assert "sys.modules" not in (ROOT / "python" / "rela_train" / "cli.py").read_text()
    listed = re.findall(r"^    (\w+)\s", cli.build_parser().format_help(), re.MULTILINE)
    assert listed == names
