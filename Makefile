# The two commands a new user needs (see README): `make demo` and `make test`.
# Developers: `make test-fast` (lint, then every test that starts no Flower process and loads no real model).
VENV ?= .venv
export TBA_FED_VENV := $(VENV)

.PHONY: setup demo lint test test-fast
setup:
	@bash scripts/setup.sh $(SETUP_FLAGS)

demo: setup
	$(VENV)/bin/tba-fed demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The whole suite includes the browser test: its set-up also installs headless Chromium (a prerequisite's
# target-specific variable: setup runs once, with the flag).
test: SETUP_FLAGS := --browser
test: lint
	$(VENV)/bin/python -m pytest -q

# Two pytest-xdist workers (tests/conftest.py gives each its share of torch's threads); `make test` stays serial:
# its Flower processes are heavy.
test-fast: lint
	$(VENV)/bin/python -m pytest -q -m "not slow" -n 2
