# Everything runs inside .venv in the repository. `make test` installs what it needs first.
# On a machine whose Python already has the torch to use (a GPU machine's CUDA build), pass
# PYTHON=python3 to use that interpreter instead of a new .venv, and SKIP_DEPS=1 where no
# package registry can be reached (only this package is then built and installed).
PY ?= python3
VENV := .venv
PYTHON ?= $(VENV)/bin/python
PIP := $(PYTHON) -m pip --disable-pip-version-check
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton>=3.4,<4
TOOLS := numpy pybind11 ninja pytest pytest-benchmark hypothesis expecttest ruff tqdm pillow matplotlib simplejpeg
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
STAMP := build/.rela-installed-$(subst /,_,$(PYTHON))
SKIP_DEPS ?= 0
PYTEST_ARGS ?=

.PHONY: install build test test-fast bench lint format clean interpreter

# The default interpreter is created on first use; an interpreter named by PYTHON= must exist.
interpreter:
	@if [ "$(PYTHON)" = "$(VENV)/bin/python" ]; then \
	  [ -x "$(PYTHON)" ] || $(PY) -m venv $(VENV); \
	else \
	  command -v "$(PYTHON)" >/dev/null || { echo "PYTHON=$(PYTHON) not found" >&2; exit 1; }; \
	fi

# torch is installed only when none is importable: on a GPU machine the CUDA build already there
# is kept, and a plain `pip install torch` (several GB of CUDA wheels) never happens here.
$(STAMP): $(SOURCES) | interpreter
	@if [ "$(SKIP_DEPS)" != 1 ]; then \
	  $(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"; \
	  $(PIP) install "$(TRITON_SPEC)" $(TOOLS); \
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
# JSON lands beside the JSONL records. `bench-records` appends the README's JSONL figures.
bench: install
	$(PYTHON) -m pytest -p no:cacheprovider -q benchmarks/test_bench_ops.py \
	  --benchmark-json=benchmarks/results/ops-pytest-benchmark-$$($(PYTHON) -c \
	  "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')").json

bench-records: install
	$(PYTHON) benchmarks/run_all.py

# The GPU proof kit for a lent GPU machine: python3 there already has CUDA torch and Triton and
# there is no network, so nothing is installed. Builds the CUDA extension in place, runs
# `pytest -m cuda`, compute-sanitizer and the GPU benchmarks, each stage time-boxed (8 minutes in
# all), and writes at most 8 files to GPU_CHECK_OUT. Without a CUDA device it exits at once.
GPU_CHECK_OUT ?= build/gpu-check
GPU_PYTHON ?= python3
.PHONY: gpu-check bench-records
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out "$(GPU_CHECK_OUT)"

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

clean:
	rm -rf build *.egg-info rela_kernels/_C*.so $(STAMP)
