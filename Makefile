# One entry point for developers and CI. `make test` works from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: venv test lint bench demo chat-demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[all]"
	touch $(STAMP)

# Two pytest-xdist workers: the suite is CPU-bound and CI machines have 2 cores (PYTEST_FLAGS= runs
# it serially).
PYTEST_FLAGS ?= -n 2
test: venv
	$(BIN)/python -m pytest -q $(PYTEST_FLAGS)

demo: venv
	scripts/demo.sh

# Pretrain -> SFT -> DPO on built-in checkable tasks (about 12 minutes on 2 CPU cores).
chat-demo: venv
	scripts/chat_demo.sh

lint: venv
	$(BIN)/ruff check --output-format concise samout tests

# Quick benchmarks (about 2 minutes on a quiet 2-core CPU, longer on a busy one); figures and JSON go to docs/figures.
# Full-size runs: see docs/benchmarks.md. BENCH_FLAGS="--threads 1" steadies timings on a busy machine.
BENCH_OUT ?= docs/figures
BENCH_FLAGS ?=
bench: venv
	$(BIN)/samout bench params --out $(BENCH_OUT)
	$(BIN)/samout bench speed --quick --out $(BENCH_OUT) $(BENCH_FLAGS)
	$(BIN)/samout bench recall --quick --out $(BENCH_OUT) $(BENCH_FLAGS)
	$(BIN)/samout bench quality --quick --corpus shakespeare --work-dir build/bench-quality --out $(BENCH_OUT) $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) build *.egg-info
