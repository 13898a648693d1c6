# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU-only torch: on a machine with a local wheel of 2.13.0 this installs in seconds; elsewhere
# the CPU index keeps pip from pulling a multi-GB CUDA build.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q "$(TORCH)" --index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[dev]"
	# Compile the duplicate search's numba steps once here, not in the first search.
	$(PY) -c "from ghostmatch.dupes import gaussnewton; gaussnewton.warm()"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m ghostmatch.demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(PY) tools/typecheck.py

# One OpenMP thread per test process: on a shared or loaded machine, torch's and faiss's
# spinning thread teams otherwise slow small tests down tenfold. A test process per core,
# each taking whole files (a file's shared fixtures are made once): on 2 cores the suite
# took 11 minutes against 20 on one process.
test: lint typecheck
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n auto --dist loadfile

bench: setup
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
