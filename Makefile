# Every target creates .venv when it is missing. torch and torchvision are installed first, at the
# tested pins, so that resolving the package's ranges never pulls a different multi-GB build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

# --no-compile: pip otherwise byte-compiles every module of every package at install (torch's
# thousands), most of which never run; Python compiles what is imported on first use instead.
# Measured on AMD EPYC AVX2, 2 cores: the torch pins 93 s -> 56 s, the package's other
# dependencies 44 s -> 31 s. The venv's own pip is used as it comes (upgrading it cost 4 s and
# changed nothing these installs need).
$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile $(TORCH_PINS)

$(VENV)/.installed: pyproject.toml $(BIN)/activate
	$(BIN)/pip install --quiet --no-compile $(TORCH_PINS) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(BIN)/activate
	$(BIN)/pip install --quiet --no-compile $(TORCH_PINS) -e '.[dev]'
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
