"""Every third-party import of the package is declared: in ``dependencies`` or an extra.

A static check: the sources under ``python/`` and ``rela_kernels/`` are parsed (nothing is
imported), every top-level module they import is classified as the standard library, one of
this project's packages, or a third-party module, and each third-party module's distribution
must appear in pyproject.toml. The ``[train]`` extra must cover what the ``rela-train``
commands need unconditionally.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "python", ROOT / "rela_kernels"]
OWN = {"rela_kernels", "rela_train"}
# Where a module's name differs from its distribution's name on the package index.
DISTRIBUTION = {"PIL": "pillow", "open_clip": "open_clip_torch", "yaml": "pyyaml"}


def third_party_imports(roots: list[Path]) -> dict[str, list[str]]:
    """Top-level third-party module -> the files (relative) that import it."""
    found: dict[str, list[str]] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in OWN or top == "__future__":
                        continue
                    found.setdefault(top, []).append(str(path.relative_to(root.parent)))
    return found


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("-", "_")


def declared() -> dict[str, set[str]]:
    """Group ("dependencies" or the extra's name) -> the distribution names it declares."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {"dependencies": {_name(r) for r in project["dependencies"]}}
    for extra, requirements in project["optional-dependencies"].items():
        groups[extra] = {_name(r) for r in requirements}
    return groups


def undeclared(imports: dict[str, list[str]], groups: dict[str, set[str]]) -> list[str]:
    every = set().union(*groups.values())
    missing = []
    for module, files in sorted(imports.items()):
        distribution = DISTRIBUTION.get(module, module).lower().replace("-", "_")
        if distribution not in every:
            missing.append(f"{module} (distribution {distribution}), imported by {files[0]}")
    return missing


def test_every_third_party_import_is_declared() -> None:
    imports = third_party_imports(SOURCES)
    assert {"torch", "numpy", "PIL", "tqdm", "matplotlib"} <= set(imports)  # the scan works
    assert undeclared(imports, declared()) == []


def test_the_train_extra_covers_the_commands() -> None:
    groups = declared()
    assert {"pillow", "tqdm", "matplotlib"} <= groups["train"]
    assert {"torch", "numpy"} <= groups["dependencies"]


def test_the_check_sees_an_undeclared_import(tmp_path: Path) -> None:
    (tmp_path / "module.py").write_text(
        "import os\nimport torch\nfrom PIL import Image\nimport rela_kernels\n"
        "from sklearn.linear_model import Ridge\n"
    )
    imports = third_party_imports([tmp_path])
    assert set(imports) == {"torch", "PIL", "sklearn"}
    groups = {"dependencies": {"torch"}, "train": {"pillow"}}
    assert [line.split(" ")[0] for line in undeclared(imports, groups)] == ["sklearn"]


def test_report_without_matplotlib_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rela_train.report import plot_runs

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ValueError, match=r"^--plot: writing a plot needs matplotlib") as error:
        plot_runs([], tmp_path / "plot.png")
    assert "\n" not in str(error.value) and not (tmp_path / "plot.png").exists()
