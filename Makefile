# grafccsr — every Python target installs .venv/ first (only when pyproject.toml changed).
# `make help` lists the targets.

PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.install-stamp

ARGS   ?=
STUDY  ?=
TRIALS ?=
WORKERS ?= 1
DEVICE ?= cpu
NAME   ?=
NPROC  ?= 2
PORT   ?= 5000

.DEFAULT_GOAL := help
.PHONY: help install test test-slow train train-ddp smoke sweep ablation report quality bench estimate max-batch calibrate rss gpu-check gpu-wheels dashboard ui clean

help: ## list the targets
	@if [ -t 1 ]; then c='\033[36m'; r='\033[0m'; else c=''; r=''; fi; \
	awk -v c="$$c" -v r="$$r" 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %s%-11s%s %s\n", c, $$1, r, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: ARGS='overrides and flags'  STUDY=name|file (sweep; default: memory_quality with CUDA, else"
	@echo "             memory_quality_cpu)  TRIALS=N  WORKERS=N  DEVICE=cpu|cuda"
	@echo "             NAME=experiment-or-study (report)  PORT=N (ui, default 5000)  NPROC=N (train-ddp, default 2)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv/ with `pip install -e .[dev]` (re-runs only when pyproject.toml changed)

test: install ## run the test suite (fast tests; slow and gpu tests are opt-in)
	$(PY) -m pytest $(ARGS)

test-slow: install ## run the slow tests too
	$(PY) -m pytest -m "slow or not slow" $(ARGS)

train: install ## train the default job on the embedded dataset (CPU: ~22 min); ARGS='+exp=amp_bs8 ...'
	$(PY) -m grafccsr.train $(ARGS)

train-ddp: install ## torchrun: NPROC ranks on this machine (CPU: add train.device=cpu); ARGS='+exp=smoke train.device=cpu'
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m grafccsr.train $(ARGS)

smoke: install ## a seconds-long end-to-end training run
	$(PY) -m grafccsr.train +exp=smoke $(ARGS)

sweep: install ## Optuna study that fits this machine, or STUDY=smoke|memory_quality|memory_quality_cpu TRIALS=N WORKERS=N
	$(PY) -m grafccsr.sweep $(STUDY) $(if $(TRIALS),--trials $(TRIALS)) --workers $(WORKERS) $(ARGS)

.PHONY: services services-stop
services: install ## local PostgreSQL + MLflow server in .services/ (prints --storage and tracking.uri; idempotent)
	$(PY) -m grafccsr.services start $(ARGS)

services-stop: ## stop what `make services` started (also cleans up stale pid files)
	@if [ -x $(PY) ]; then $(PY) -m grafccsr.services stop $(ARGS); else echo "no $(VENV): nothing was started"; fi

ablation: install ## memory guide items one by one vs a baseline (CPU ~2 min; ARGS='--preset gpu' on CUDA)
	$(PY) -m analysis.ablation $(ARGS)

report: install ## reports/<NAME>/report.md + html (NAME = MLflow experiment or sweep study; default grafccsr)
	$(PY) -m analysis.report $(if $(NAME),--name $(NAME)) $(ARGS)

quality: install ## time-to-quality benchmark of the recipes, reports/quality/ (CPU: --budget-min 40 by default)
	$(PY) -m analysis.quality $(ARGS)

bench: install ## speed/memory benchmark table vs the original preset (DEVICE=cpu|cuda)
	$(PY) -m grafccsr.bench --device $(DEVICE) $(ARGS)

estimate: install ## CUDA peak-memory estimate without a GPU: ARGS='+exp=amp_bs8'
	$(PY) -m grafccsr.memory estimate $(ARGS)

max-batch: install ## largest batch under a memory budget: ARGS='+exp=amp_bs8 --budget-mb 24000 [--search-samples]'
	$(PY) -m grafccsr.memory max-batch $(ARGS)

calibrate: install ## estimator vs measured peaks, CSV + table (DEVICE=cuda on a GPU)
	$(PY) -m grafccsr.memory calibrate --device $(DEVICE) $(ARGS)

rss: install ## CPU: s/iteration and peak process RSS above baseline: ARGS='+exp=graf_ccsr_original model.patch.rays_per_patch=1024 --threads 2' (~8 GiB)
	$(PY) -m grafccsr.memory rss $(ARGS)

gpu-check: ## on a CUDA machine (~8 min): gpu tests + bench --grid gpu + calibrate, into OUT (default runs/gpu-check; no install step)
	bash .ci/gpu-check

GPU_PYTHON ?= 3.12
gpu-wheels: install ## .whl/ for a bare GPU machine: hydra, pytest and their pure-Python deps; PyYAML, numpy for GPU_PYTHON (3.12)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip wheel --quiet --no-deps -w .whl $$($(PY) -m pip freeze | grep -i -E '^(hydra-core|omegaconf|antlr4-python3-runtime|pytest|pytest-timeout|pluggy|iniconfig|pygments|packaging)==')
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(PY) -m pip freeze | grep -i -E '^(pyyaml|numpy)==')
	ls .whl

dashboard: install ## Optuna dashboard on 127.0.0.1:8080: sweeps/optuna.db or $GRAFCCSR_STORAGE; ARGS='--storage services --port N'
	$(PY) -m grafccsr.cli.dashboard $(ARGS)

ui: install ## MLflow UI on the project's store (sqlite:///mlflow.db)
	@echo "open http://127.0.0.1:$(PORT)/#/experiments?workflowType=machine_learning (MLflow's model-training view)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port $(PORT)

clean: ## remove runs, reports, caches (keeps .venv/, mlflow.db and data/)
	rm -rf runs reports outputs multirun .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
