# Set-up and checks: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?= -n 2 --durations=25

.PHONY: install demo test docs lint format benchmark-scaling clean

# The runtime dependencies only (what `make demo` and the commands need): no test tools,
# torch, triton, libtpu or lm-eval.
$(VENV)/.installed-runtime: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

# Everything `make test` needs: the test and docs extras, and libtpu, for compiling the TPU
# kernels on this host (tests/test_pallas_compile.py), kept out of site-packages so that JAX
# never starts it as a backend.
$(VENV)/.installed-test: $(VENV)/.installed-runtime
	$(PIP) install -e '.[test,docs]'
	$(PY) benchmarks/compile_kernels.py --install_libtpu
	touch $@

install: $(VENV)/.installed-test

# Trains configs/demo.py on the built-in corpus (README.md gives the time measured on 2 CPU
# cores), evaluates, prints a sample and where the checkpoints and logs are. Run again: it
# says the run is complete and how to extend it (--config.train.num_steps).
DEMO_WORKDIR ?= workdirs/demo
demo: $(VENV)/.installed-runtime
	$(PY) train.py --config=configs/demo.py --workdir=$(DEMO_WORKDIR)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) docs
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The documentation site (docs/, mkdocs.yml); warnings are errors. Serve it with
# `$(VENV)/bin/mkdocs serve`.
DOCS_SITE_DIR ?= site
docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir $(DOCS_SITE_DIR)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

benchmark-scaling: install
	$(PY) benchmarks/scaling.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache site
