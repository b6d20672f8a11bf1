"""Builds rela_kernels._C: C++ CPU kernels everywhere, CUDA kernels where CUDA torch and nvcc exist.

RELA_BUILD_CUDA=0/1 overrides the CUDA detection. Install with --no-build-isolation so the build
uses the torch already installed instead of downloading one.
"""

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - build-time guidance only
    raise SystemExit(
        "rela-kernels builds against an installed torch: install torch first, then run "
        "`pip install --no-build-isolation .`"
    ) from error

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("RELA_BUILD_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            raise SystemExit(f"RELA_BUILD_CUDA must be 0 or 1, got {flag!r}")
        return flag == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    cuda = _want_cuda()
    sources = _rel([os.path.join(ROOT, "csrc", "rela.cpp")])
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-std=c++20"]
    define_macros = []
    if cuda:
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        define_macros.append(("RELA_WITH_CUDA", None))
        nvcc = ["-O3", "-lineinfo", "-std=c++20"]
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if arch is None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        return [
            CUDAExtension(
                "rela_kernels._C",
                sources,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
                include_dirs=[os.path.join(ROOT, "csrc")],
            )
        ]
    return [
        CppExtension(
            "rela_kernels._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            include_dirs=[os.path.join(ROOT, "csrc")],
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
