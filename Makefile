# hisa: DeepSeek-V3.2 inference with the DSA and HISA indexers (numpy on CPU, CuPy on GPU).
# Every target sets up its own environment first: a .venv with requirements.txt installed, or, on a
# machine whose python3 already has CuPy and the rest (the GPU machine, which has no registry), that python3.

PROMPT  ?= The history of the
CKPT    ?= weights/dsv32-small
INDEXER ?= dsa
TOKENS  ?= 64
TEMP    ?= 0.7
TOPP    ?= 0.9
ARGS    ?=
PY      := .venv/bin/python

.PHONY: help run test bench eval setup clean

help:  ## list the targets and their variables
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 10
	@echo "variables: PROMPT CKPT=$(CKPT) INDEXER=$(INDEXER) (dense|dsa|hisa|block) TOKENS=$(TOKENS) TEMP=$(TEMP) TOPP=$(TOPP)"
	@echo "           ARGS='--chat --top-p 0.9 --precision float --hisa-block 128 --hisa-blocks 64 --device cpu ...'"
	@echo "           make eval ARGS='--quick --device cpu --docs 20 --ckpt DIR ...' (python bench/eval.py --help)"

run: setup  ## generate text: make run PROMPT="..." [CKPT=folder INDEXER=hisa TOKENS=64 TEMP=0.7 TOPP=0.9]
	$(PY) model.py --ckpt "$(CKPT)" --prompt "$(PROMPT)" --indexer $(INDEXER) --max-new-tokens $(TOKENS) --temperature $(TEMP) --top-p $(TOPP) $(ARGS)

test: setup  ## kernel parity and model tests (GPU-only tests skip without a GPU)
	$(PY) -m pytest -q tests

bench: setup  ## speed tables of the indexers and the model (GPU); JSON under bench/
	$(PY) bench/bench.py $(ARGS)

eval: setup  ## HISA vs DSA fidelity, needle in a haystack, perplexity on weights/dsv32-small; results under bench/eval/
	$(PY) bench/eval.py $(ARGS)

setup: .venv/ready  ## create the environment (done by every target)

.venv/ready: requirements.txt
	@if python3 -c "import cupy, numpy, tokenizers, safetensors, tqdm, pytest, ml_dtypes" 2>/dev/null; then \
		echo "setup: using the installed $$(command -v python3) (CuPy and the requirements are present)"; \
		mkdir -p .venv/bin; \
		printf '#!/bin/sh\nexec %s "$$@"\n' "$$(command -v python3)" > $(PY); chmod +x $(PY); \
	else \
		echo "setup: creating .venv and installing requirements.txt"; \
		python3 -m venv .venv && $(PY) -m pip install -q -r requirements.txt; \
	fi
	@touch $@

clean:  ## remove the environment and generated checkpoints
	rm -rf .venv weights/random-tiny .pytest_cache
