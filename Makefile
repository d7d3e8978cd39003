# kronos-kit: `make help` lists the targets. Every target runs the project's own venv interpreter.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON_BOOTSTRAP ?= python3
# CPU build by default; GPU users pass their own, e.g. TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url <cuda index>"
TORCH_SPEC ?= torch==2.13.0
KERNEL_NAME ?= kronos-kit
CONFIG ?=  # empty: configs/default.yaml for a new run; a resumed run uses its own saved config
PYTEST_ARGS ?=

.PHONY: help setup git-filter pipeline sweep base lab test test-fast lint format strip bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

setup: $(PY)  ## create .venv with kronos-kit[dev] and register the Jupyter kernel "kronos-kit"
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already in $(VENV); keeping it"; \
	else \
	  echo "installing $(TORCH_SPEC)"; $(PY) -m pip install --quiet "$(TORCH_SPEC)" $${PIP_EXTRA:-}; \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL_NAME) --display-name "Python ($(KERNEL_NAME))" >/dev/null
	@$(MAKE) --no-print-directory git-filter
	@echo "ready: $(VENV) with kernel '$(KERNEL_NAME)'"

# nbstripout as this clone's git filter: what JupyterLab's autosave writes into notebooks/ (outputs, widget
# state) never reaches git and `git diff` stays empty (`git status` lists such a notebook until `git add`, which
# stages nothing: git compares sizes before it filters); .gitattributes (committed) names the filter, the
# filter's command lives in .git/config, which no clone carries: hence this step. Same keys as `make strip`.
git-filter:  ## install nbstripout as this clone's git filter for notebooks (make setup runs it)
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  $(VENV)/bin/nbstripout --install --attributes .gitattributes && \
	  git config filter.nbstripout.extrakeys "$$($(PY) -c 'from kronos_kit.notebooks import EXTRA_KEYS; print(EXTRA_KEYS)')" && \
	  echo "git filter: nbstripout strips notebook outputs on commit"; \
	else echo "not a git checkout: no git filter installed"; fi

pipeline: $(PY)  ## run 01 -> 02 -> 03 into runs/ (ARGS="-p data=bars.csv", ARGS="--run-dir RUN --resume")
	$(PY) -m kronos_kit pipeline $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

sweep: $(PY)  ## search the finetuning settings (ARGS="--space configs/sweeps/default.yaml --workers 2", "--sweep-dir DIR --resume")
	$(PY) -m kronos_kit sweep $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

base: $(PY)  ## re-pretrain the embedded tiny base checkpoints on the S&P 500 sample
	$(PY) -m kronos_kit pretrain --config configs/pretrain_base.yaml

# Lab serves the project root (runs/ and configs/ browsable beside notebooks/) and opens notebooks/;
# extra options pass through: make lab ARGS="--port 8899 --no-browser"
# as root (a container) Jupyter refuses to start without --allow-root
lab: $(PY)  ## JupyterLab on the project, opened at notebooks/ (ARGS="--port 8899" passes options)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks \
	  $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

# .ci/run-tests keeps pytest's exit status and turns exit 5 ("collected no tests") into a failure
test: $(PY)  ## run the whole test suite (what CI runs)
	PY=$(PY) .ci/run-tests $(PYTEST_ARGS)

test-fast: $(PY)  ## the test suite without the slow end-to-end tests
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(PY)  ## ruff, and a check that notebooks are stripped as the git filter writes them
	$(VENV)/bin/ruff check .
	$(PY) -m kronos_kit strip-notebooks --check notebooks

format: $(PY)  ## apply ruff's fixes
	$(VENV)/bin/ruff check --fix .

strip: $(PY)  ## remove outputs and execution counts from notebooks/*.ipynb (run before committing)
	$(PY) -m kronos_kit strip-notebooks notebooks

bench: $(PY)  ## run every benchmark script and print the figures
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f; done

clean:  ## remove caches and build files (keeps .venv and runs/)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info benchmarks/out
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -exec rm -rf {} +
