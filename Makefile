# make demo / make test / make lint / make bench. The first use creates .venv and installs.
# `make test` runs the lint first: CI rejects what `make lint` rejects.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests run on the CPU with four fake devices, so sharded code paths are exercised anywhere.
TEST_ENV := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 TF_CPP_MIN_LOG_LEVEL=3
WORKDIR ?= workdirs/demo
# Two pytest-xdist workers, one test file each at a time (a file's module fixtures are built
# once): most tests are single-threaded compiles or subprocess start-ups, so one process
# leaves the second core idle. 2026-12-06, 2-core CPU: 930 s against 1282 s in one process.
# `make test TEST_WORKERS=0` runs everything in this process.
TEST_WORKERS ?= 2

.PHONY: venv test lint format demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# ruff formats the Python code blocks of README.md too: they are part of the lint.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .

test: lint
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

demo: venv
	$(PY) -m mirnet_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

bench: venv
	$(PY) -m mirnet_jax.benchmark --config=configs/lol.py --mode=train_step --batch=4 --size=128
	$(PY) -m mirnet_jax.benchmark --config=configs/lol.py --mode=forward --batch=1 --size=400,600

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
