"""The engine's module layout: no import cycles, no private names used outside their package."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import rela_kernels as rk

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rela_kernels"
# Imported inside functions on purpose: importing rela_kernels must not import triton.
LAZY = ("rela_kernels.triton",)


def _imports(tree: ast.AST) -> list[tuple[str, list[str], bool]]:
    """(module, names, at module level) of every import; TYPE_CHECKING blocks left out."""
    found: list[tuple[str, list[str], bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, [], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [alias.name for alias in child.names]
                found.append((child.module, names, top))
                # `from rela_kernels import store` imports the submodule
                found.extend((f"{child.module}.{name}", [], top) for name in names)
            inner = top and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            visit(child, inner)

    visit(tree, True)
    return found


def _kernel_modules() -> dict[str, list[tuple[str, list[str], bool]]]:
    return {
        f"rela_kernels.{path.stem}": _imports(ast.parse(path.read_text()))
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem != "__init__"
    }


def test_engine_modules_import_each_other_at_module_level_only() -> None:
    modules = _kernel_modules()
    late = [
        (module, target)
        for module, imports in modules.items()
        for target, _, top in imports
        if not top and target.startswith("rela_kernels") and not target.startswith(LAZY)
    ]
    assert late == [], "function-level imports hide cycles; import at the top of the module"


def test_engine_import_graph_has_no_cycle() -> None:
    modules = _kernel_modules()
    graph = {
        module: {target for target, _, top in imports if top and target in modules}
        for module, imports in modules.items()
    }
    assert graph["rela_kernels.ops"] >= {"rela_kernels.transport", "rela_kernels.registry"}
    state: dict[str, str] = {}

    def walk(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join([*path, module])}"
        state[module] = "open"
        for target in sorted(graph[module]):
            walk(target, [*path, module])
        state[module] = "done"

    for module in graph:
        walk(module, [])


def test_no_private_engine_names_outside_the_engine() -> None:
    offenders = []
    for folder in ("python", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, names, _ in _imports(ast.parse(path.read_text())):
                if not module.startswith("rela_kernels"):
                    continue
                private = [part for part in module.split(".") if part.startswith("_")]
                private += [name for name in names if name.startswith("_")]
                if private:
                    offenders.append(f"{path.relative_to(ROOT)}: {module} {private}")
            if "rk.backends._" in path.read_text() or "transport._" in path.read_text():
                offenders.append(f"{path.relative_to(ROOT)}: private attribute of rela_kernels")
    assert offenders == []


def test_public_names_after_the_split() -> None:
    import sys

    transport_module = sys.modules["rela_kernels.transport"]
    fitting = sys.modules["rela_kernels.fitting"]
    assert rk.transport is transport_module.transport  # the op, not the module
    assert rk.Transport is transport_module.Transport
    assert rk.fit_pca_whitening is fitting.fit_pca_whitening
    assert rk.fit_least_squares is fitting.fit_least_squares
    assert "runs_on" in rk.backends.__all__
    assert rk.backends.runs_on("reference", torch.device("cpu"))
    assert not rk.backends.runs_on("cuda", torch.device("cpu"))


def test_transport_call_is_the_op(generator: torch.Generator) -> None:
    t = rk.Transport(torch.randn(5, generator=generator), torch.randn(5, 3, generator=generator))
    p = torch.randn(7, 5, generator=generator)
    assert torch.equal(t(p), rk.transport(p, t))
    with pytest.raises(ValueError, match=r"^rk\.transport: p must have 5 columns"):
        t(p[:, :4])


def test_gemm_dtype_is_checked(generator: torch.Generator) -> None:
    x = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"gemm_dtype must be torch\.float32 or torch\.float64"):
        rk.fit_pca_whitening(x, 2, gemm_dtype=torch.float16)
    single = rk.fit_pca_whitening(x, 2, gemm_dtype=torch.float32)
    double = rk.fit_pca_whitening(x, 2)
    np.testing.assert_allclose(single.matrix.numpy(), double.matrix.numpy(), rtol=1e-4)


def test_numpy_integers_pass_the_shared_int_check(tmp_path: Path) -> None:
    with rk.EmbeddingStore.create_or_resume(
        tmp_path / "s", np.int64(3), np.int32(2), fingerprint="fp", prior="p", input_size=None
    ) as store:
        assert (store.n, store.dim) == (3, 2) and type(store.n) is int
    with pytest.raises(ValueError, match=r"^rk\.EmbeddingStore: chunk_rows must be >= 1, got 0$"):
        rk.EmbeddingStore.create_or_resume(
            tmp_path / "t", 3, 2, fingerprint="fp", prior="p", input_size=None, chunk_rows=0
        )
    with pytest.raises(TypeError, match=r"^rk\.SubsetSampler: seed must be an int, got float$"):
        rk.SubsetSampler(10, 0.5, seed=1.0)
