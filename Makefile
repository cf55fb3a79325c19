# Every target creates .venv when it is missing. Each install names the tested torch and torchvision
# pins on its command line, so resolving the package's ranges never pulls a different multi-GB build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The demo installs with --no-compile: pip otherwise byte-compiles every module of every package
# (torch's thousands), most of which the demo never imports; Python compiles what it imports instead.
# The install times with and without: docs/performance.md, "Install, demo and test suite".
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --no-compile $(TORCH_PINS) -e .
	touch $@

# The tests start many Python processes (torchrun, the fault-injection runs): each would compile
# torch's modules again where no .pyc can be written (PYTHONDONTWRITEBYTECODE, set on this project's
# machines; the suite's times: docs/performance.md). So everything is compiled once here, also what an
# earlier `make demo` installed without (compileall skips what is compiled already).
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PINS) -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true  # torch ships a 3.12-only file pip skips too
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/vae train --config configs/demo.yaml

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

# The data and training benchmarks at their default settings (about 15 minutes on 2 cores); each
# prints its table and the command that made it. benchmarks/quality.py is left out: hours on a CPU.
bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks vae_train.py

clean:
	rm -rf $(VENV) build src/*.egg-info
