# Two commands matter: `make demo` (set up, then train end to end) and `make test`.
# uv: the one on PATH, else a project-local copy that .ci/bootstrap_uv.py fetches from the package
# index without pip (a stock Debian/Ubuntu python3 refuses `pip install`: PEP 668).
UV ?= $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
# Some machines set PYTHONDONTWRITEBYTECODE=1: then every process (each Airflow task, server and
# test subprocess) compiles TensorFlow, MLflow and Airflow again, about 10 s of CPU each here.
unexport PYTHONDONTWRITEBYTECODE
PY := .venv/bin/python
EXTRA ?= cpu

.PHONY: setup lint format demo train test test-fast test-system test-browser test-containers airflow-ui mlflow-ui bench bench-gpu stack-start stack-stop clean

setup: .venv/.synced

.venv/.synced: pyproject.toml uv.lock
	@command -v python3 >/dev/null || command -v $(UV) >/dev/null || { echo "error: neither python3 nor uv is \
	installed: install python3 (Debian/Ubuntu: sudo apt install python3) and run make again" >&2; exit 1; }
	@if [ "$(UV)" = .tools/bin/uv ]; then python3 .ci/bootstrap_uv.py --tools .tools --python-of pyproject.toml; \
	elif command -v python3 >/dev/null; then python3 .ci/bootstrap_uv.py --uv "$(UV)" --python-of pyproject.toml; fi
	$(UV) sync --frozen --extra $(EXTRA)
	@touch $@

## Train end to end on $WBC_DATA_DIR (or generated demo data when unset), embedded state in .wbc/
demo: setup
	$(PY) -m wbc_tasks.cli train --profile cpu $(ARGS)

## Lint and types (what CI runs before the tests): ruff (lint + format), mypy on wbc_tasks/ and wbc_airflow/,
## and the import layering (lint-imports: the contracts in pyproject.toml)
lint: setup
	.venv/bin/ruff check wbc_tasks wbc_airflow dags tests stack bench
	.venv/bin/ruff format --check wbc_tasks wbc_airflow dags tests stack bench
	.venv/bin/mypy wbc_tasks wbc_airflow
	.venv/bin/lint-imports

## Apply ruff's fixes and formatting
format: setup
	.venv/bin/ruff check --fix wbc_tasks wbc_airflow dags tests stack bench
	.venv/bin/ruff format wbc_tasks wbc_airflow dags tests stack bench

## The whole test suite (what CI runs): unit, DAG and end-to-end tests (two processes: about half the
## time of one on two cores), then the native-stack system test
test: setup
	$(PY) -m pytest -q -n 2 --durations=20 -m "not system and not containers and not browser"
	$(PY) -m pytest -q --durations=10 -m system tests/system

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not system and not containers and not browser"

test-system: setup
	$(PY) -m pytest -q -m system tests/system

## The lab's pages in a real browser (Debian's chromium, installed when missing; needs root then):
## one Airflow started as README says, the HTTP checks and the browser walk-through (~2 min)
test-browser: setup
	tests/lab/install-chromium.sh
	$(PY) -m pytest -q -p no:randomly --durations=10 -m browser tests/lab

## The docker-compose stack for real (podman, as root): builds the images, runs both DAGs in
## containers (~20 min cold on 2 cores). COLD=1 first removes the images it built (a cold build).
## In file order (-p no:randomly): one stack, one scenario (weights missing first, then added).
test-containers: setup
	tests/containers/install-podman.sh
	WBC_CONTAINER_TEST_COLD=$(if $(COLD),1,0) $(PY) -m pytest -q -s -p no:randomly --durations=0 -m containers tests/containers

stack-start: setup
	stack/start

stack-stop:
	stack/stop

airflow-ui: setup
	$(PY) -m wbc_tasks.cli airflow-ui $(ARGS)

mlflow-ui: setup
	$(PY) -m wbc_tasks.cli mlflow-ui $(ARGS)

## Every CPU benchmark (about an hour on 2 cores); results go into docs/benchmarks.md by hand
bench: setup
	$(PY) bench/bench_data_stages.py
	$(PY) bench/bench_memory_scaling.py
	$(PY) bench/bench_preprocess.py
	$(PY) bench/bench_dag_parse.py
	$(PY) bench/bench_training_input.py
	$(PY) bench/bench_inference.py
	$(PY) bench/bench_precision.py
	$(PY) bench/bench_engine_choice.py
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_training.py --epochs 2 --epochs-without-smote 4

## On a GPU machine, `make bench-gpu EXTRA=gpu`: fp32 vs mixed precision vs XLA, share of peak FLOP/s
bench-gpu: setup
	$(PY) bench/bench_gpu_training.py
	$(PY) bench/bench_inference.py --images 256

clean:
	rm -rf .wbc .pytest_cache .tools
