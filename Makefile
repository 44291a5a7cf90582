# One entry point for developers and CI. `make test` works from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: venv test lint bench demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[all]"
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	scripts/demo.sh

lint: venv
	$(BIN)/ruff check --output-format concise samout tests

clean:
	rm -rf $(VENV) build *.egg-info
