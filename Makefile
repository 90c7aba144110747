# The two set-up commands of the README: `make demo` (train → evaluate → index the bundled sample) and `make test`.
# Both create or reuse .venv and install the project with the CPU build of torch pinned in constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= data/sample_medical
RUNS   ?= runs
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo train eval index test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: train eval index

train: $(STAMP)
	$(BIN)/mrl train --data $(DATA) --output $(RUNS)/demo-model --batch-size 32 --overwrite

eval: $(STAMP)
	$(BIN)/mrl eval --data $(DATA) --model sentence-transformers/all-MiniLM-L6-v2 --model $(RUNS)/demo-model \
		--out $(RUNS)/demo-eval

index: $(STAMP)
	$(BIN)/mrl index build --data $(DATA) --model $(RUNS)/demo-model --output $(RUNS)/demo-index

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(RUNS) .pytest_cache
