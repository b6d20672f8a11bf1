# Everything runs inside .venv in the repository. `make test` installs what it needs first.
# On a machine whose Python already has the torch to use (a GPU machine's CUDA build), pass
# PYTHON=python3 to use that interpreter instead of a new .venv, and SKIP_DEPS=1 where no
# package registry can be reached (only this package is then built and installed).
PY ?= python3
VENV := .venv
PYTHON ?= $(VENV)/bin/python
PIP := $(PYTHON) -m pip --disable-pip-version-check
TORCH_SPEC ?= torch==2.13.0
# Where torch comes from when none is importable: PyTorch's CPU index (a plain index serves the
# CUDA build on Linux, several GB). Empty: pip's configured index. Where that index cannot be
# reached, pip gives up on it at once and uses its configured find-links and extra indexes.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TRITON_SPEC ?= triton>=3.4,<4
# setuptools>=77 reads the SPDX `license = "Apache-2.0"`; tensorboard, lightning and build are
# what the TensorBoard, example and wheel tests use; scikit-learn ships the digits behind the
# switch study's prior from another distribution; safetensors is the backbone export's format.
TOOLS := numpy pybind11 ninja pytest pytest-benchmark hypothesis expecttest ruff tqdm pillow \
  matplotlib simplejpeg "setuptools>=77" wheel build tensorboard lightning scikit-learn \
  safetensors
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
STAMP := build/.rela-installed-$(subst /,_,$(PYTHON))
SKIP_DEPS ?= 0
PYTEST_ARGS ?=

.PHONY: install build test test-fast bench lint format clean interpreter triton-side gpu-compile \
  gpu-compile-calibrate

# The default interpreter is created on first use; an interpreter named by PYTHON= must exist.
interpreter:
	@if [ "$(PYTHON)" = "$(VENV)/bin/python" ]; then \
	  [ -x "$(PYTHON)" ] || $(PY) -m venv $(VENV); \
	else \
	  command -v "$(PYTHON)" >/dev/null || { echo "PYTHON=$(PYTHON) not found" >&2; exit 1; }; \
	fi

# torch is installed only when none is importable: on a GPU machine the CUDA build already there
# is kept, and a plain `pip install torch` (several GB of CUDA wheels) never happens here. The
# tools are installed with the torch already there pinned (`torch==<its version>`), so a tool
# that depends on torch (lightning) can never replace it: pip fails instead.
$(STAMP): $(SOURCES) | interpreter
	@if [ "$(SKIP_DEPS)" != 1 ]; then \
	  $(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install \
	    $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)" --timeout 10 --retries 0) \
	    "$(TORCH_SPEC)"; \
	  $(PIP) install "$(TRITON_SPEC)" $(TOOLS) \
	    "torch==$$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	fi
	$(PIP) install --no-build-isolation --no-deps -e .
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

# Incremental rebuild of rela_kernels._C in place (ninja) after editing csrc/.
build: | interpreter
	$(PYTHON) setup.py build_ext --inplace

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

# Op benchmarks through pytest-benchmark (small shapes on CPU, the GPU targets' on CUDA); the
# JSON lands beside the JSONL records. `bench-records` appends the JSONL records of docs/benchmarks.md.
bench: install
	$(PYTHON) -m pytest -p no:cacheprovider -q benchmarks/test_bench_ops.py \
	  --benchmark-json=benchmarks/results/ops-pytest-benchmark-$$($(PYTHON) -c \
	  "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')").json

bench-records: install
	$(PYTHON) benchmarks/run_all.py

# The GPU proof kit for a GPU machine: python3 there already has CUDA torch and Triton and
# there is no network, so nothing is installed. Builds the CUDA extension in place, runs
# `pytest -m "cuda or interop"`, compute-sanitizer and the GPU benchmarks, each stage time-boxed (9 minutes in
# all), and writes at most 8 files to GPU_CHECK_OUT. Without a CUDA device it exits at once.
# GPU_CHECK_ARGS passes options on, e.g. the stages that run only when named:
# make gpu-check GPU_CHECK_ARGS="--stages bench-train-folder,bench-train-compiled-byol,bench-train-compiled-rela"
GPU_CHECK_OUT ?= build/gpu-check
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
.PHONY: gpu-check bench-records
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out "$(GPU_CHECK_OUT)" $(GPU_CHECK_ARGS)

# Fashion-MNIST demo (README's first command): BYOL on all data vs BYOL + ReLA on 50%.
# Installs Debian's dataset-fashion-mnist package when the IDX files are missing and we can.
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=
.PHONY: demo
demo: install
	@if [ ! -e "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz" ] && \
	    [ ! -e "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Fashion-MNIST not found: installing dataset-fashion-mnist with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST not found in $(FASHION_MNIST_DIR)." >&2; \
	    echo "Install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put" >&2; \
	    echo "the four *-ubyte.gz IDX files in a directory and run: make demo FASHION_MNIST_DIR=DIR" >&2; \
	    exit 1; \
	  fi; \
	fi
	$(PYTHON) -m rela_train demo --data-dir "$(FASHION_MNIST_DIR)" $(DEMO_ARGS)

# ---------------------------------------------------------------------------------------------
# `make cuda-compile`: the whole CUDA extension compiled on a machine with nvcc and no GPU.
# It builds exactly what setup.py builds with CUDA (csrc/rela.cpp and csrc/cpu/*.cpp with
# RELA_WITH_CUDA, csrc/cuda/*.cu including the torch glue bindings.cu) against a CUDA build of
# torch installed into a side venv outside the repository (CUDA_VENV; made on first use with
# CUDA_PY, reused afterwards). The CUDA headers ATen includes beyond the toolkit's (cuBLAS,
# cuSPARSE, cuSOLVER) come from the nvidia-* wheels that torch pulls into that venv.
# The sources are staged by content (`install -C` leaves unchanged files alone) into a build
# directory outside the source tree (CUDA_BUILD_DIR), so ninja's cache survives a fresh clone in
# another folder and only edited files recompile. The result is
# $(CUDA_BUILD_DIR)/lib/rela_kernels/_C.*.so; the source tree's own _C.so is never touched.
# Default: torch 2.11.0+cu130 on Python 3.12 from PyPI, a common GPU-machine setup.
# `CUDA_TORCH_SPEC=torch==2.14.1 CUDA_PY=python3.11` uses the build this VM's mirror holds.
# docs/benchmarks.md ("Compiling the CUDA extension without a GPU") records what a first and a second
# run cost; the first downloads ~3 GB of wheels and compiles for minutes, so the test suite
# never starts it (tests/test_cuda_compile.py runs only where CUDA_VENV exists).
CUDA_TORCH_SPEC ?= torch==2.11.0
CUDA_PY ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
CUDA_CACHE ?= $(HOME)/.cache/rela-kernels
CUDA_TAG := $(subst ==,-,$(subst /,_,$(CUDA_TORCH_SPEC)))
CUDA_VENV ?= $(CUDA_CACHE)/cuda-venv-$(CUDA_TAG)
CUDA_BUILD_DIR ?= $(CUDA_CACHE)/cuda-build-$(CUDA_TAG)
CUDA_ARCH_LIST ?= 9.0
CUDA_MAX_JOBS ?= 2
CUDA_STAMP := $(CUDA_VENV)/.rela-installed-$(CUDA_TAG)
CUDA_EXT_FILES := setup.py pyproject.toml README.md $(shell find csrc -type f)

.PHONY: cuda-compile cuda-compile-locked cuda-compile-paths

$(CUDA_STAMP):
	[ -x "$(CUDA_VENV)/bin/python" ] || "$(CUDA_PY)" -m venv "$(CUDA_VENV)"
	@# numpy only so that importing torch during the build does not warn.
	"$(CUDA_VENV)/bin/python" -m pip install --disable-pip-version-check "$(CUDA_TORCH_SPEC)" \
	  setuptools wheel ninja numpy
	touch "$@"

# One build at a time per build directory (the test suite may run this while a person does).
cuda-compile: $(CUDA_STAMP)
	@command -v nvcc >/dev/null || [ -n "$(CUDA_HOME)" ] || \
	  { echo "cuda-compile: nvcc not found on PATH and CUDA_HOME not set" >&2; exit 1; }
	@mkdir -p "$(CUDA_BUILD_DIR)"
	flock "$(CUDA_BUILD_DIR)/.lock" $(MAKE) --no-print-directory cuda-compile-locked

# CUDA_HOME defaults to the toolkit nvcc itself runs from (the `nvcc` on PATH may be a wrapper
# script outside the toolkit, where torch's own guess would look).
cuda-compile-locked:
	@set -e; src="$(CUDA_BUILD_DIR)/src"; \
	for f in $(sort $(CUDA_EXT_FILES)); do install -C -D -m 644 "$$f" "$$src/$$f"; done; \
	cd "$$src" && find csrc -type f | while read -r f; do \
	  [ -e "$(CURDIR)/$$f" ] || rm -f "$$f"; done
	@set -e; \
	cuda_home="$${CUDA_HOME:-$$(nvcc -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | \
	  sed -n 's/^#\$$ TOP=//p' | head -n 1)}"; \
	cuda_home="$$(readlink -f "$$cuda_home")"; \
	site="$$("$(CUDA_VENV)/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"; \
	wheel_includes="$$(ls -d "$$site"/nvidia/*/include 2>/dev/null | tr '\n' ':')"; \
	echo "cuda-compile: $(CUDA_TORCH_SPEC) CUDA_HOME=$$cuda_home TORCH_CUDA_ARCH_LIST=$(CUDA_ARCH_LIST) MAX_JOBS=$(CUDA_MAX_JOBS) -> $(CUDA_BUILD_DIR)/lib"; \
	cd "$(CUDA_BUILD_DIR)/src" && CUDA_HOME="$$cuda_home" \
	  TORCH_CUDA_ARCH_LIST="$(CUDA_ARCH_LIST)" MAX_JOBS="$(CUDA_MAX_JOBS)" RELA_BUILD_CUDA=1 \
	  CPATH="$${wheel_includes}$${CPATH:-}" \
	  "$(CUDA_VENV)/bin/python" setup.py -q build_ext --build-lib ../lib --build-temp ../obj
	@ls "$(CUDA_BUILD_DIR)"/lib/rela_kernels/_C*.so

# ---------------------------------------------------------------------------------------------
# The compile gate (docs/gpu-compile.md): every Triton configuration the launchers can launch,
# compiled for sm_80 and sm_90 without a GPU, under the pinned Triton and under Triton 3.6.0 (what
# a common GPU-machine setup), plus nvcc -cubin of the torch-free CUDA sources. Triton 3.6.0 lives
# in a side directory outside the repository (pip --target, no dependencies: it needs none at
# import), installed by `make install` where a package index answers; tests/test_compile_gate.py
# skips its Triton 3.6 part, with the reason, where it is absent.
TRITON_SIDE_SPEC ?= triton==3.6.0
TRITON_SIDE_DIR ?= $(CUDA_CACHE)/$(subst ==,-,$(TRITON_SIDE_SPEC))
TRITON_SIDE_STAMP := $(TRITON_SIDE_DIR)/.rela-installed
GATE := env -u TRITON_INTERPRET $(PYTHON) benchmarks/compile_gate.py
GATE_RESULTS ?= benchmarks/results

install: triton-side

triton-side: | interpreter
	@if [ "$(SKIP_DEPS)" != 1 ] && [ ! -e "$(TRITON_SIDE_STAMP)" ]; then \
	  { $(PIP) install --quiet --no-deps --target "$(TRITON_SIDE_DIR)" "$(TRITON_SIDE_SPEC)" && \
	    touch "$(TRITON_SIDE_STAMP)"; } || \
	  echo "warning: $(TRITON_SIDE_SPEC) not installed into $(TRITON_SIDE_DIR): the compile" \
	    "gate's Triton 3.6 checks will be skipped" >&2; \
	fi

# The whole matrix (minutes): records to $(GATE_RESULTS)/compile_gate-triton-*.jsonl.
gpu-compile: install
	$(GATE) --results-dir $(GATE_RESULTS) --nvcc-out $(GATE_RESULTS)/nvcc_cubin.jsonl
	@if [ -e "$(TRITON_SIDE_STAMP)" ]; then \
	  $(GATE) --results-dir $(GATE_RESULTS) --triton-path "$(TRITON_SIDE_DIR)"; \
	else echo "gpu-compile: no $(TRITON_SIDE_SPEC) in $(TRITON_SIDE_DIR), skipped" >&2; fi

# Re-measures every configuration and rewrites rela_kernels/triton/measured_resources.json
# (after a kernel or a config list changed; the gate test fails while the table is stale).
gpu-compile-calibrate: install
	$(GATE) --calibrate --results-dir $(GATE_RESULTS)
	@if [ -e "$(TRITON_SIDE_STAMP)" ]; then \
	  $(GATE) --calibrate --results-dir $(GATE_RESULTS) --triton-path "$(TRITON_SIDE_DIR)"; \
	else echo "gpu-compile-calibrate: no $(TRITON_SIDE_SPEC) in $(TRITON_SIDE_DIR)" >&2; exit 1; fi

# For tests/test_compile_gate.py: where Triton 3.6.0 is.
triton-side-path:
	@echo "TRITON_SIDE_DIR=$(TRITON_SIDE_DIR)"

# ---------------------------------------------------------------------------------------------
# `make interop-venv`: a side venv outside the repository where torchvision and timm import, for
# the test that loads an exported backbone into them (tests/test_backbone_interop.py; it skips,
# with the reason, where this venv is missing). The index's torchvision wheels link the CUDA
# build of torch, which imports without a GPU; `===` pins that build, because `==` also matches
# the local CPU build. About 4.8 GB; made on first use and reused afterwards.
INTEROP_TORCH_SPEC ?= torch===2.13.0
INTEROP_SPECS ?= torchvision==0.28.0 timm safetensors
INTEROP_PY ?= $(CUDA_PY)
INTEROP_VENV ?= $(CUDA_CACHE)/interop-venv-$(subst =,-,$(subst ===,-,$(INTEROP_TORCH_SPEC)))
INTEROP_STAMP := $(INTEROP_VENV)/.rela-installed

.PHONY: interop-venv interop-venv-path

interop-venv: $(INTEROP_STAMP)

$(INTEROP_STAMP):
	[ -x "$(INTEROP_VENV)/bin/python" ] || "$(INTEROP_PY)" -m venv "$(INTEROP_VENV)"
	"$(INTEROP_VENV)/bin/python" -m pip install --disable-pip-version-check \
	  "$(INTEROP_TORCH_SPEC)" $(INTEROP_SPECS) numpy
	"$(INTEROP_VENV)/bin/python" -c "import torch, torchvision, timm, safetensors"
	touch "$@"

# For tests/test_backbone_interop.py and benchmarks/gpu_check.py: where the interop venv is.
interop-venv-path:
	@echo "INTEROP_VENV=$(INTEROP_VENV)"

# For tests/test_cuda_compile.py: where the side venv and the build directory are.
cuda-compile-paths:
	@echo "CUDA_VENV=$(CUDA_VENV)"
	@echo "CUDA_BUILD_DIR=$(CUDA_BUILD_DIR)"

clean:
	rm -rf build *.egg-info rela_kernels/_C*.so $(STAMP)
