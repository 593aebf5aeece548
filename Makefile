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
CI_RUN := build/ci
# The two ci-preset runs of `make test` share the 2 cores, one thread each (same setting in both: same tables).
ONE_THREAD := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

.PHONY: venv data paper paper-ci test test-unit test-notebooks lint format sync bench determinism data-record lab clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	python3 scripts/install_env.py $(VENV)
	touch $@

venv: $(VENV)/.installed  ## create .venv and install the pinned environment

data: venv  ## rebuild data/ from its pinned sources and verify it against data.dvc
	gradsense fetch-data

paper: data  ## regenerate every figure and table (full CPU paper)
	dvc repro

paper-ci: data  ## the whole pipeline on the tiny `ci` preset (params-ci.yaml) by `dvc repro`, in build/ci
	rm -rf $(CI_RUN) && mkdir -p $(CI_RUN)
	cp -r dvc.yaml notebooks src $(CI_RUN)/ && cp params-ci.yaml $(CI_RUN)/params.yaml && cp -al data $(CI_RUN)/data
	cd $(CI_RUN) && dvc init --no-scm -q && dvc config core.analytics false && dvc repro

test: data lint  ## every test: lint, unit + integration (pytest), notebooks (nbval) beside `dvc repro` of the ci preset, tables compared
	pytest -q tests
	$(MAKE) --no-print-directory determinism

test-unit: venv  ## the tests that need no data/ (tiny random Llama)
	pytest -q tests -m "not integration"

test-notebooks: data  ## run every pipeline notebook in order with its default (ci) parameters under nbval, in build/nbtest
	rm -rf $(NBTEST) && mkdir -p $(NBTEST)/notebooks $(NBTEST)/later
	cp notebooks/0[0-6]_*.ipynb $(NBTEST)/notebooks/
	cp notebooks/0[7-9]_*.ipynb notebooks/explore.ipynb $(NBTEST)/later/  # explore runs last: it reads 04's checkpoint
	pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env $(NBTEST)/notebooks
	gradsense run --root $(NBTEST) --params params-ci.yaml  # the ci preset's trainings (dvc: one training@<key> each)
	gradsense replicate --root $(NBTEST) --params params-ci.yaml  # notebooks 01–05 on the second model (replication@)
	mv $(NBTEST)/later/*.ipynb $(NBTEST)/notebooks/ && rmdir $(NBTEST)/later
	pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env $(NBTEST)/notebooks/0[7-9]_*.ipynb $(NBTEST)/notebooks/explore.ipynb

determinism: data  ## the ci preset twice at once: under nbval and by `dvc repro`; every result table must be byte-identical
	@mkdir -p build
	@$(ONE_THREAD) $(MAKE) --no-print-directory test-notebooks > build/nbtest.log 2>&1 & nb=$$!; \
	 $(ONE_THREAD) $(MAKE) --no-print-directory paper-ci > build/paper-ci.log 2>&1 & ci=$$!; \
	 wait $$nb; nb_rc=$$?; wait $$ci; ci_rc=$$?; \
	 tail -n 3 build/nbtest.log; tail -n 2 build/paper-ci.log; \
	 if [ $$nb_rc -ne 0 ]; then tail -n 60 build/nbtest.log; echo "nbval failed (build/nbtest.log)"; exit 1; fi; \
	 if [ $$ci_rc -ne 0 ]; then tail -n 40 build/paper-ci.log; echo "dvc repro of the ci preset failed (build/paper-ci.log)"; exit 1; fi
	python scripts/compare_results.py $(NBTEST)/results $(CI_RUN)/results
	cd $(CI_RUN) && dvc status --quiet  # the dvc run is complete: nothing left to reproduce
	python scripts/check_instances.py $(CI_RUN)  # one run's params changed: only its training@<key> instance retrains
	rm -rf build/sweep && cp -a $(CI_RUN) build/sweep
	python scripts/check_sweep.py build/sweep  # a two-point sweep as queued DVC experiments, both in `dvc exp show`
	@# the real page in headless Chromium (images load, links resolve, no errors); .ci/run installs Chromium, and
	@# under CI a missing browser or screenshot fails, elsewhere the check is skipped with one line
	@if command -v chromium > /dev/null || [ -n "$$CI" ]; then \
	   test -s $(CI_RUN)/results/paper/page.png || { echo "the paper stage kept no screenshot: is Chromium installed?"; exit 1; }; \
	   python -m gradsense.browser $(CI_RUN)/results/paper/08_paper.html; \
	 else echo "no Chromium: the browser check of the paper page is skipped (apt-get install chromium)"; fi

lint:  ## ruff: lint and format check
	ruff check src tests benchmarks scripts notebooks/src
	ruff format --check src tests benchmarks scripts notebooks/src

format:  ## ruff: fix what can be fixed and format
	ruff check --fix src tests benchmarks scripts notebooks/src
	ruff format src tests benchmarks scripts notebooks/src

sync:  ## after editing notebooks/src/*.py: update each paired .ipynb (jupytext; JupyterLab keeps pairs in sync itself)
	for f in notebooks/src/*.py; do jupytext --quiet --update --to ipynb -o notebooks/$$(basename $${f%.py}).ipynb $$f; done

bench: data  ## speed benchmarks (results/bench/*.json)
	python benchmarks/bench_gradients.py
	python benchmarks/bench_training.py
	python benchmarks/bench_pipeline.py --ci --full
	python benchmarks/bench_describe.py  # the full paper's describer when results/ has it, else the ci preset's

data-record: venv  ## maintainers only: re-record data/ in data.dvc after changing sources/facts/
	gradsense fetch-data || true
	dvc add data

lab: venv  ## JupyterLab (pinned in the env) on the notebooks; jupytext pairs each .ipynb with its script; as root it adds --allow-root itself; more flags: ARGS="--port 8899 --no-browser"
	jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS) notebooks/

clean:
	rm -rf build results figures .dvc/tmp
