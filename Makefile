# smoe-gguf: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test demo clean

install: $(STAMP)

# llama-cpp-python builds from source the first time (about 4.5 minutes on 2 cores); pip caches
# the wheel, so later installs take seconds. For a GPU build see README (CMAKE_ARGS).
$(STAMP): pyproject.toml smoe_gguf/_gatecb.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

clean:
	rm -rf .demo .pytest_cache
