# Two commands do everything on a fresh machine: `make paper` (regenerate the paper) and `make test` (every test).
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export PYTHONHASHSEED := 0
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
NBTEST := build/nbtest

.PHONY: venv data paper paper-ci test test-unit test-notebooks bench determinism data-record lab clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(VENV)/.installed  ## create .venv and install the pinned environment

data: venv  ## rebuild data/ from its pinned sources and verify it against data.dvc
	gradsense fetch-data

paper: data  ## regenerate every figure and table (full CPU paper)
	dvc repro

paper-ci: data  ## the whole pipeline on the tiny `ci` preset (params-ci.yaml) in build/ci
	rm -rf build/ci && mkdir -p build/ci
	cp -r dvc.yaml notebooks src build/ci/ && cp params-ci.yaml build/ci/params.yaml && cp -al data build/ci/data
	cd build/ci && dvc init --no-scm -q && dvc config core.analytics false && dvc repro

test: data  ## every test: unit (tiny model), integration (real SmolLM2), notebooks (nbval, ci preset), determinism
	pytest -q tests
	$(MAKE) --no-print-directory test-notebooks
	$(MAKE) --no-print-directory determinism

test-unit: venv
	pytest -q tests -m "not integration"

test-notebooks: data  ## run every pipeline notebook in order with its default (ci) parameters under nbval
	rm -rf $(NBTEST) && mkdir -p $(NBTEST)/notebooks
	cp notebooks/[0-9][0-9]_*.ipynb $(NBTEST)/notebooks/
	pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env $(NBTEST)/notebooks

bench: data  ## speed benchmarks (results/bench/*.json)
	python benchmarks/bench_gradients.py
	python benchmarks/bench_training.py
	python benchmarks/bench_pipeline.py --ci --full

data-record: venv  ## maintainers only: re-record data/ in data.dvc after changing sources/facts/
	gradsense fetch-data || true
	dvc add data

lab: venv  ## JupyterLab on the notebooks
	$(BIN)/pip install -q jupyterlab==4.6.6
	jupyter lab notebooks/

clean:
	rm -rf build results figures .dvc/tmp

determinism: data  ## the ci preset by `dvc repro`, then `dvc repro --force` again: every result table must be byte-identical
	$(MAKE) --no-print-directory paper-ci
	rm -rf build/ci-first && cp -r build/ci/results build/ci-first
	cd build/ci && dvc repro --force
	python scripts/compare_results.py build/ci-first build/ci/results
