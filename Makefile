# Everything runs inside .venv in the repository. `make test` installs what it needs first.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip --disable-pip-version-check
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton>=3.4,<4
TOOLS := numpy pybind11 ninja pytest pytest-benchmark expecttest ruff tqdm pillow matplotlib
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
STAMP := $(VENV)/.rela-installed
PYTEST_ARGS ?=

.PHONY: install build test test-fast bench lint format clean

$(PYTHON):
	$(PY) -m venv $(VENV)

# torch is installed only when none is importable: on a GPU machine the CUDA build already there
# is kept, and a plain `pip install torch` (several GB of CUDA wheels) never happens here.
$(STAMP): $(SOURCES) | $(PYTHON)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install "$(TRITON_SPEC)" $(TOOLS)
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

install: $(STAMP)

# Incremental rebuild of rela_kernels._C in place (ninja) after editing csrc/.
build: | $(PYTHON)
	$(PYTHON) setup.py build_ext --inplace

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PYTHON) benchmarks/run_all.py

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
