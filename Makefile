# atomlens: `make demo` sets up and runs the QM9 demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# test-only reference for LRP; --no-deps keeps torchvision (incompatible wheel) out
	$(BIN)/python -m pip install -q --no-deps zennit==0.5.1
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/atomlens demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
