# medjax: every target bootstraps .venv on a fresh machine (Python 3.11, PyPI only).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.train-installed: pyproject.toml setup.py medjax/models/_onednn_ffi.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[train]'
	@touch $@

$(VENV)/.dev-installed: pyproject.toml setup.py medjax/models/_onednn_ffi.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.train-installed

## demo: train a 2D U-Net on the MNI152 template shipped in nilearn, print held-out Dice, write PNGs
demo: $(VENV)/.train-installed
	$(BIN)/python scripts/train.py --config medjax/configs/mni152_demo.py --workdir $(DEMO_DIR)
	$(BIN)/python scripts/evaluate.py --workdir $(DEMO_DIR) --pictures 20 --overwrite
	@echo "demo outputs: $(DEMO_DIR)/{checkpoints,best,metrics.jsonl,images,eval}"

## test: the whole suite (2 workers; an idle worker takes tests queued for the other, so the
## few minute-long tests do not leave one waiting)
test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=15 tests

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev-installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

$(VENV)/.bench-installed: pyproject.toml setup.py medjax/models/_onednn_ffi.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $@ $(VENV)/.dev-installed $(VENV)/.train-installed

## bench: every training step beside its PyTorch/MONAI reference, every config's input pipeline, sliding-window inference beside MONAI (tables: build/bench/)
bench: $(VENV)/.bench-installed
	@mkdir -p build/bench
	$(BIN)/python benchmarks/suite.py --json build/bench/suite.json --markdown build/bench/suite.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
	rm -f medjax/models/_onednn_ffi*.so
