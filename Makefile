# charlstm — every command a user or CI runs. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
# The first of Python 3.11, 3.12, 3.13 on PATH (make PYTHON=/path/to/python to choose).
PYTHON ?= $(or $(shell command -v python3.11 2>/dev/null),$(shell command -v python3.12 2>/dev/null),$(shell command -v python3.13 2>/dev/null),python3.11)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# Tests and the demo read this corpus when given (offline machines); otherwise the demo downloads Alice.
CORPUS ?=
export CORPUS
# The fine-tuning benchmark's second corpus (default: invented prose the benchmark writes).
CORPUS2 ?=
export CORPUS2

.PHONY: help venv test test-fast lint lock demo bench bench-train bench-corpus bench-s3 bench-finetune clean

help:
	@echo "make demo   - local S3 + Ray head, train and sample through 'ray job submit', show results"
	@echo "make test   - the whole test suite (unit + end-to-end against a live Ray head and local S3)"
	@echo "make lint   - ruff + hadolint"
	@echo "make lock   - regenerate requirements-docker.lock (the image's pinned, hashed dependencies; needs uv, PyPI)"
	@echo "make bench  - benchmarks side by side with the tutorial's method (long; CORPUS=... required)"

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: no Python 3.11, 3.12 or 3.13 found ($(PYTHON)); install one or run make PYTHON=/path/to/python3.12" >&2; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# The tests that start no server run two at a time (each is mostly one busy thread); the end-to-end ones, which
# start Ray clusters and time their waits, one at a time after them. Both halves always run; either failing fails.
test: venv
	@rc=0; \
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 -n 2 -m "not e2e" tests || rc=1; \
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 -m e2e tests || rc=1; \
	exit $$rc

test-fast: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 -m "not e2e" tests

lint: venv
	$(BIN)/ruff check job infra tests bench
	$(BIN)/hadolint Dockerfile

lock:
	@command -v uv >/dev/null || { echo "error: uv not found; install it (pip install uv) and run make lock again" >&2; exit 2; }
	uv pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --extra gpu \
		--custom-compile-command "make lock" --output-file requirements-docker.lock pyproject.toml

demo: venv
	bash infra/demo.sh

bench: venv
	$(BIN)/python -m bench.run

bench-train: venv
	$(BIN)/python -m bench.run --only train

bench-corpus: venv
	$(BIN)/python -m bench.run --only corpus

bench-s3: venv
	$(BIN)/python -m bench.run --only s3

bench-finetune: venv
	$(BIN)/python -m bench.run --only finetune

clean:
	-$(BIN)/python -m infra.localstack stop 2>/dev/null
	rm -rf runs out .stack
