# The README's commands. `make test` works on a fresh machine: it creates the virtualenv,
# installs the project, installs the real services (Debian packages, livekit-server built
# from its Go module, cached) and runs pytest.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The Python client is its own distribution (infra/integrations/); the service's CLI and demo use it.
CLIENT := infra/integrations/lipsync-client

.PHONY: setup services test lint demo clean

setup: $(STAMP) services

$(STAMP): pyproject.toml constraints.txt $(CLIENT)/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]' -e $(CLIENT)
	touch $(STAMP)

services: $(STAMP)
	$(PY) -m infra.setup

test: setup
	@set +e; $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: setup
	$(VENV)/bin/lipsync demo

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
