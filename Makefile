# The README's commands. Each one creates the virtual environment on first use (plain pip, from
# pyproject.toml), so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_TORCH_COMPILE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-avx2 test-all tiny bench lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

data/tiny/train.jsonl: | $(STAMP)
	$(BIN)/python scripts/make_tiny_dataset.py data/tiny --force

tiny: $(STAMP) data/tiny/train.jsonl
	$(BIN)/python scripts/encode_codes.py configs/tiny.yaml
	$(BIN)/python train.py configs/tiny.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The tests marked `numerics` again with the AVX2 kernels of ATen, oneDNN and MKL (each library
# dispatches on its own; MKL's is the one that changes float32 GEMM rounding), what a CPU without
# AVX-512 runs: a result that holds only on this machine's kernels fails here too.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(STAMP)
	$(AVX2) $(BIN)/python -m pytest -q -m "numerics and not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python scripts/bench_ttt.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
