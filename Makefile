# One entry point for developers and CI. `make test` works from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package of the test environment, transitive ones included, pinned exactly (`make lock`).
LOCK := requirements-test.txt

.PHONY: venv lock test test-latest lint bench demo chat-demo clean

venv: $(STAMP)

# The test environment is the lock and nothing else: no resolver runs, so a release published
# tomorrow cannot change what `make test` tests. A changed lock rebuilds the venv from scratch.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps "$$(grep '^pip==' $(LOCK))"
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# Regenerate the lock: the newest releases the pyproject ranges allow, for this Python, with
# torch at its pin (constraints.txt), plus what builds and installs samout (setuptools, pip).
# uv does not read pip's configuration: the directory holding the CPU build of torch is taken
# from pip's find-links (FIND_LINKS= to use uv's own settings, e.g. UV_EXTRA_INDEX_URL).
FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV ?= $(BIN)/uv
lock: venv
	printf 'setuptools>=77\npip\n' | $(UV) pip compile pyproject.toml - --extra all \
		-c constraints.txt --python-version 3.11 $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) \
		--custom-compile-command "make lock" --quiet -o $(LOCK)

# Two pytest-xdist workers: the suite is CPU-bound and CI machines have 2 cores (PYTEST_FLAGS= runs
# it serially).
PYTEST_FLAGS ?= -n 2
test: venv
	$(BIN)/python -m pytest -q $(PYTEST_FLAGS)

# The whole suite on the newest releases the pyproject ranges allow (torch kept at its pin),
# resolved afresh on every run in a second venv: what a user who runs `pip install samout`
# today gets. When it fails, fix the code or narrow the range with a comment naming the release.
LATEST := .venv-latest
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c constraints.txt -e ".[all]"
	$(LATEST)/bin/python -m pip check
	$(LATEST)/bin/python -m pytest -q $(PYTEST_FLAGS)

demo: venv
	scripts/demo.sh

# Pretrain -> SFT -> GRPO (and DPO) on built-in checkable tasks (about 15 minutes on 2 CPU cores).
chat-demo: venv
	scripts/chat_demo.sh

lint: venv
	$(BIN)/ruff check --output-format concise samout tests
	$(BIN)/python scripts/check_import_cycles.py

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
	rm -rf $(VENV) $(LATEST) build *.egg-info
