# The two set-up commands of the README: `make demo` (train → evaluate → index → serve the bundled sample) and `make test`.
# Both create or reuse .venv and install the project with the CPU build of torch pinned in constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= data/sample_medical
RUNS   ?= runs
PORT   ?= 8000
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo train eval index serve test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: train eval index serve

train: $(STAMP)
	$(BIN)/mrl train --data $(DATA) --output $(RUNS)/demo-model --epochs 4 --batch-size 32 --overwrite

eval: $(STAMP)
	$(BIN)/mrl eval --data $(DATA) --model sentence-transformers/all-MiniLM-L6-v2 --model $(RUNS)/demo-model \
		--out $(RUNS)/demo-eval

index: $(STAMP)
	$(BIN)/mrl index build --data $(DATA) --model $(RUNS)/demo-model --output $(RUNS)/demo-index

serve: $(STAMP)
	@echo "Serving $(RUNS)/demo-index on http://127.0.0.1:$(PORT) (Ctrl-C stops). Try, in another terminal:"
	@echo "  curl 'http://127.0.0.1:$(PORT)/search?q=sudden+painful+swollen+big+toe+joint+at+night&dim=64&k=3'"
	@echo "  curl 'http://127.0.0.1:$(PORT)/dims'   # dims served, with their NDCG@10;  docs: http://127.0.0.1:$(PORT)/docs"
	$(BIN)/mrl serve --index $(RUNS)/demo-index --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(RUNS) .pytest_cache
