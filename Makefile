# atomlens: `make demo` sets up and runs the QM9 demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the tested torch first: the package itself states a range, so the pin lives here.
	# TORCH_INDEX=https://download.pytorch.org/whl/cpu fetches the CPU build from PyTorch's
	# index instead of the package registry's default build. --no-cache-dir: where no local
	# CPU wheel is found, the registry's build is several GB, and a cached copy would double it
	$(BIN)/python -m pip install -q --no-cache-dir torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[all,test]'
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
