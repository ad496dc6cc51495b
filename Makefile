# The two commands a new user needs (see README): `make demo` and `make test`.
VENV ?= .venv
export TBA_FED_VENV := $(VENV)

.PHONY: setup demo test
setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/tba-fed demo

test: setup
	$(VENV)/bin/python -m pytest -q
