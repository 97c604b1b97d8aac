# smoe-gguf: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install lint sanitize test demo clean reference-model large-reference bench

install: $(STAMP)

# llama-cpp-python builds from source the first time (about 4.5 minutes on 2 cores); pip caches
# the wheel, so later installs take seconds. For a GPU build see README (CMAKE_ARGS).
$(STAMP): pyproject.toml smoe_gguf/_gatecb.c smoe_gguf/_readpool.c smoe_gguf/_pager.c smoe_gguf/_speculate.c smoe_gguf/_speculate.h smoe_gguf/_memo.c smoe_gguf/_xslot_buft.c smoe_gguf/_pager.h smoe_gguf/_smoe_job.h
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

lint: install
	$(BIN)/ruff check smoe_gguf tests scripts

# `make sanitize`: the read pool (smoe_gguf/_readpool.c) stressed by tests/native/readpool_stress.c
# under ThreadSanitizer, then under AddressSanitizer + UndefinedBehaviorSanitizer; then the gate, its
# native pager, its speculation and the pool built with AddressSanitizer + UBSan, then
# ThreadSanitizer, under the engine's stress test, the pager's tests against stock llama.cpp and
# native speculation's and the token memo's (scripts/sanitized_pytest.sh, tests/test_readpool.py,
# tests/test_pager.py, SAN_SPEC); any report fails
# the make. Built with the system C compiler into build/sanitize/ (no virtualenv), always afresh
# (SANITIZE_DEFS=-DSMOE_TEST_RACE or -DSMOE_TEST_OVERFLOW plants a bug in the harness to see it
# fail). A few seconds each. ThreadSanitizer runs with ASLR off where setarch can turn it off:
# some compilers' TSan refuses high-entropy layouts ("unexpected memory mapping").
SAN_DIR   := build/sanitize
SAN_SRC   := tests/native/readpool_stress.c
SAN_CFLAGS := -std=c11 -g -O1 -fno-omit-frame-pointer -pthread -Wall -Wextra $(SANITIZE_DEFS)
SAN_OS    := $(shell uname -s)
SAN_LIBS  := $(if $(filter Linux,$(SAN_OS)),-ldl)
SAN_LEAKS := $(if $(filter Darwin,$(SAN_OS)),0,1)
SAN_SPEC  := tests/test_speculate.py::test_decoded_tokens_guessed_in_c_are_scored_exactly_as_in_python \
	tests/test_token_memo.py::test_the_memo_s_steps_in_c_rank_choose_score_and_keep_as_numpy_does
SAN_NOASLR = $(shell setarch $$(uname -m) -R true >/dev/null 2>&1 && echo setarch $$(uname -m) -R)

sanitize: install
	@mkdir -p $(SAN_DIR)
	$(CC) $(SAN_CFLAGS) -fsanitize=thread -o $(SAN_DIR)/readpool_stress_tsan $(SAN_SRC) $(SAN_LIBS)
	$(CC) $(SAN_CFLAGS) -fsanitize=address,undefined -fno-sanitize-recover=all \
		-o $(SAN_DIR)/readpool_stress_asan $(SAN_SRC) $(SAN_LIBS)
	TSAN_OPTIONS=halt_on_error=1 $(SAN_NOASLR) $(SAN_DIR)/readpool_stress_tsan
	ASAN_OPTIONS=detect_leaks=$(SAN_LEAKS):abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(SAN_DIR)/readpool_stress_asan
	scripts/sanitized_pytest.sh address $(SAN_DIR) $(BIN)/python tests/test_readpool.py tests/test_pager.py \
		$(SAN_SPEC)
	$(SAN_NOASLR) scripts/sanitized_pytest.sh thread $(SAN_DIR) $(BIN)/python tests/test_readpool.py \
		tests/test_pager.py $(SAN_SPEC) -k "not chooses"

test: install lint sanitize
	$(BIN)/python -m pytest -q

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

clean:
	rm -rf .demo .pytest_cache

# The reference MoE (README, "Reference model"): trained here from the machine's own text in
# under 20 minutes on 2 cores, built once into models/ and reused (delete the .gguf to rebuild).
REF_MODEL := models/reference-qwen3moe.gguf
REF_STAMP := $(VENV)/.reference-stamp

reference-model: $(REF_MODEL)

$(REF_MODEL): | $(REF_STAMP)
	$(BIN)/python scripts/build_reference_model.py -o $@

# The large reference (scripts/build_large_reference.py): the trained reference with every expert
# widened x16 by zero neurons (3 MiB leaves, 1.5 GiB of experts; same routing and outputs, checked
# against the trained model by the build). About 3 minutes once the trained reference exists.
LARGE_REF := models/reference-large-qwen3moe.gguf

large-reference: $(LARGE_REF)

$(LARGE_REF): $(REF_MODEL)
	$(BIN)/python scripts/build_large_reference.py $(REF_MODEL) -o $@ --force

# the `reference` extra (torch, CPU wheel; matplotlib) into .venv, installing the project first
# if it is not there (an installed project is not reinstalled: that would rebuild its extension)
$(REF_STAMP):
	@test -f $(STAMP) || $(MAKE) install
	$(BIN)/python -c 'import torch, matplotlib' 2>/dev/null || $(BIN)/python -m pip install -q -e '.[reference]'
	@touch $@

# `make bench`: stock llama.cpp vs smoe-gguf, cold, side by side; writes bench/results.json,
# bench/report.md, bench/plot.png. Default: the reference model (`make reference-model`, about
# 19 minutes the first time) and the large reference (`make large-reference`, about 3 minutes
# more), each built here with its pack if missing; 4 prompts (one per corpus domain) x 128 sampled
# tokens. Any model: make bench MODEL=models/x.gguf BUDGETS=10%,25% N=16, e.g. the random medium
# model: make bench MODEL=models/medium-qwen3moe-f16.gguf (a sibling models/x.pack is what
# smoe-gguf runs where it exists).
MEDIUM_MODEL := models/medium-qwen3moe-f16.gguf
MODEL   ?= $(REF_MODEL) $(LARGE_REF)
BUDGETS ?= 10%,25%,50%,100%
N       ?= 128
PROMPTS ?= 4
ROW_SECONDS ?= 60
BENCH_ARGS ?=

$(MEDIUM_MODEL):
	@test -f $(STAMP) || $(MAKE) install
	$(BIN)/python scripts/make_test_model.py --arch qwen3moe --preset medium -o $@

models/%.pack: models/%.gguf
	$(BIN)/smoe-gguf split $< -o $@ --force

bench: $(MODEL) $(patsubst %.gguf,%.pack,$(filter models/%.gguf,$(MODEL)))
	@test -f $(STAMP) || $(MAKE) install
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install -q -e '.[bench]'
	nice -n 5 $(BIN)/python scripts/bench.py $(MODEL) --budgets '$(BUDGETS)' -n $(N) --prompts $(PROMPTS) \
		--row-seconds $(ROW_SECONDS) \
		--out bench --command 'make bench MODEL="$(strip $(MODEL))" BUDGETS=$(BUDGETS) N=$(N) PROMPTS=$(PROMPTS)$(if $(strip $(BENCH_ARGS)), BENCH_ARGS="$(strip $(BENCH_ARGS))")' $(BENCH_ARGS)
