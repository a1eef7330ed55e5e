# The two set-up commands (README): `make serve` and `make test`. Each installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

.PHONY: install tools serve test lint bench train-default clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Debian tools the tests use: promtool (checks the /metrics exposition) and wrk (light load generator).
tools:
	@bash scripts/install-tools.sh

serve: install
	$(VENV)/bin/moe-serve serve

test: install tools
	$(PY) -m ruff check service tests load_tests
	$(PY) -m pytest -q

bench: install tools
	$(VENV)/bin/moe-serve bench --quick

train-default: install
	$(VENV)/bin/moe-serve train --recipe recipes/bbc-news-moe.yaml --output models/bbc-news-moe

clean:
	rm -rf $(VENV) reports .pytest_cache .ruff_cache
