# The whole set-up on a fresh clone is `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean bench perf-check perf-baseline

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m xla_backend.tools.demo $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# One pytest-xdist worker per core, at most 4 (each holds a torch_xla runtime); a module's
# tests share a worker, so its expensive fixtures run once. PYTEST_ARGS="-n 0": one process.
test: $(STAMP) lint
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadscope $(PYTEST_ARGS)

# pytest-benchmark suites (benchmarks/test_bench_*.py); plain `pytest` collects tests/ only.
bench: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark-only -q $(PYTEST_ARGS)

# The CI performance gate: exact counters and syncfree_xla/eager step-time ratios
# against benchmarks/perf_baseline.json. `make perf-baseline` records new figures.
perf-check: $(STAMP)
	$(PY) benchmarks/perf_check.py

perf-baseline: $(STAMP)
	$(PY) benchmarks/perf_check.py --update

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
