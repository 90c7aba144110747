# The two set-up commands of the README: `make demo` (fine-tune → adaptor → evaluate → index → serve the bundled
# sample) and `make test`.
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

.PHONY: bench-strategies install demo train eval index serve test test-fast lint docs docs-serve clean bench bench-models image image-gpu

# `make bench`: every benchmark on the shared BEIR datasets, then the figures of docs/results.md (docs/benchmarks.md).
DATASETS ?= ../shared/datasets
BENCH    ?= $(RUNS)/bench
MODELS   := $(RUNS)/models
FIGURES  := docs/figures

$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,dev,docs,peers,tracking,milvus]' -e './client[langchain,llamaindex]'
	touch $(STAMP)

install: $(STAMP)

demo: train eval index serve

# The recipe the learning curves support (docs/results.md): a Matryoshka adaptor on the base model first (a
# rotation below 1,000 questions, so the full dim is the base model's exactly), fine-tuning from the rotated model
# on every training question (the number of epochs chosen by 5-fold cross-validation: 12 held out cannot choose),
# then the rotation again on the tuned model. Every step chooses by 5-fold cross-validation under the never-worse
# rule and keeps its input when nothing holds every dim. runs/demo-model is the result.
train: $(STAMP)
	$(BIN)/mrl adapt --data $(DATA) --output $(RUNS)/demo-rotated --overwrite
	$(BIN)/mrl train --data $(DATA) --model $(RUNS)/demo-rotated --output $(RUNS)/demo-tuned --epochs 4 \
		--batch-size 32 --folds 5 --overwrite
	$(BIN)/mrl adapt --data $(DATA) --model $(RUNS)/demo-tuned --output $(RUNS)/demo-model --overwrite

eval: $(STAMP)
	$(BIN)/mrl eval --data $(DATA) --model sentence-transformers/all-MiniLM-L6-v2 --model $(RUNS)/demo-rotated \
		--model $(RUNS)/demo-tuned --model $(RUNS)/demo-model --output $(RUNS)/demo-eval

index: $(STAMP)
	$(BIN)/mrl index build --data $(DATA) --model $(RUNS)/demo-model --index $(RUNS)/demo-index

serve: $(STAMP)
	@echo "Serving $(RUNS)/demo-index on http://127.0.0.1:$(PORT) (Ctrl-C stops). Try, in another terminal:"
	@echo "  curl 'http://127.0.0.1:$(PORT)/search?q=sudden+painful+swollen+big+toe+joint+at+night&dim=64&k=3'"
	@echo "  curl 'http://127.0.0.1:$(PORT)/dims'   # dims served, with their NDCG@10;  docs: http://127.0.0.1:$(PORT)/docs"
	$(BIN)/mrl serve --index $(RUNS)/demo-index --port $(PORT)

# Three pytest-xdist workers, one module each at a time (module fixtures are built once), the modules with
# slow tests handed out first (tests/conftest.py orders them); conftest also splits the cores between the
# workers. Three on two cores: much of the suite waits on servers (Milvus, restarts), and a third worker
# fills those waits (9:54 against 11:15 with two, on 2026-12-04). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

# The docs site (MkDocs, Material theme) into site/, strictly: a broken link, anchor or missing page fails it.
# docs/hooks.py writes the HTTP API and settings reference pages from the code. The tests build it too.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not --quiet: mkdocs then stops counting the warnings

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict --dev-addr 127.0.0.1:8001

# Tuned models, one per dataset; an existing one is kept. MedQuAD and PIAF train on a sample of
# their train split to fit a 2-core CPU (see the README); drop --max-train-pairs on a GPU.
$(MODELS)/scifact/mrl.json: | $(STAMP)
	$(BIN)/mrl train --data $(DATASETS)/scifact --output $(MODELS)/scifact --hard-negatives --eval-split none --overwrite
$(MODELS)/medquad/mrl.json: | $(STAMP)
	$(BIN)/mrl train --data $(DATASETS)/medquad --output $(MODELS)/medquad --max-train-pairs 1024 --epochs 1 \
		--eval-split none --overwrite
$(MODELS)/piaf_fr/mrl.json: | $(STAMP)
	$(BIN)/mrl train --data $(DATASETS)/piaf_fr --output $(MODELS)/piaf_fr --max-train-pairs 768 --epochs 2 \
		--eval-split none --overwrite
$(RUNS)/scifact-index/current: $(MODELS)/scifact/mrl.json
	$(BIN)/mrl index build --data $(DATASETS)/scifact --model $(MODELS)/scifact --index $(RUNS)/scifact-index

bench-models: $(MODELS)/scifact/mrl.json $(MODELS)/medquad/mrl.json $(MODELS)/piaf_fr/mrl.json

bench: bench-models $(RUNS)/scifact-index/current
	$(BIN)/mrl bench latency --index $(RUNS)/scifact-index --queries $(DATASETS)/scifact \
		--encoders torch,onnx,onnx-int8 --rerank --out $(BENCH)
	$(BIN)/mrl bench quality --datasets-root $(DATASETS) --models-dir $(MODELS) --no-train \
		--latency scifact=$(BENCH)/latency.json --out $(BENCH)
	$(BIN)/mrl bench encoders --index $(RUNS)/scifact-index --queries $(DATASETS)/scifact --out $(BENCH)
	$(BIN)/mrl bench scaling --out $(BENCH)
	$(BIN)/mrl bench peers --index $(RUNS)/scifact-index --data $(DATASETS)/scifact --out $(BENCH)
	$(BIN)/mrl bench backends --data $(DATASETS)/scifact --out $(BENCH)
	$(BIN)/mrl bench passages --data $(DATASETS)/medquad_pages --out $(BENCH)
	$(BIN)/mrl bench writes --index $(RUNS)/scifact-index --data $(DATASETS)/medquad --out $(BENCH)
	$(BIN)/mrl bench agreement --datasets-root $(DATASETS) --models base,$(MODELS)/medquad --out $(BENCH)
	$(BIN)/mrl bench latency --index $(RUNS)/scifact-index --queries $(DATASETS)/scifact --dims 64 --encoders onnx \
		--concurrency 1,16 --requests 1000 --warmup 50 --shadow-fractions 0,0.02,1,0 --no-in-process --out $(BENCH)/shadow
	$(BIN)/mrl bench formats --data $(DATASETS)/scifact --out $(BENCH)
	$(BIN)/mrl bench curves --data $(DATASETS)/medquad $(DATASETS)/scifact $(DATASETS)/medquad_pages \
		--sizes 50,200,1000 --max-finetune 50 --max-docs 2000 --adaptor-steps 200 --out $(BENCH)/curves
	$(MAKE) bench-strategies
	mkdir -p $(FIGURES)
	cp $(BENCH)/quality_vs_dim.png $(BENCH)/quality_vs_latency.png $(BENCH)/scaling.png $(BENCH)/backends.png $(BENCH)/peers.png \
		$(BENCH)/passages.png $(BENCH)/agreement.png $(BENCH)/curves/curves.png $(FIGURES)/

# Full fine-tuning vs frozen lower layers vs LoRA, each direction with the other dataset as the forgetting
# check. 2 epochs on SciFact's 919 pairs / 384 of MedQuAD's; both test splits scored on 1,000 queries and
# 3,000 documents at most: sized for 2 CPU cores (about 2 hours in all; the models are reused afterwards).
STRATEGIES = --models-dir $(MODELS)/strategies --cache $(BENCH)/cache --epochs 2 --max-queries 1000 --max-docs 3000
bench-strategies:
	$(BIN)/mrl bench strategies --data $(DATASETS)/scifact --ood $(DATASETS)/medquad --max-train-pairs 919 \
		$(STRATEGIES) --out $(BENCH)/strategies-scifact
	$(BIN)/mrl bench strategies --data $(DATASETS)/medquad --ood $(DATASETS)/scifact --max-train-pairs 384 \
		$(STRATEGIES) --out $(BENCH)/strategies-medquad
	mkdir -p $(FIGURES)
	cp $(BENCH)/strategies-scifact/strategies.png $(FIGURES)/strategies_scifact.png
	cp $(BENCH)/strategies-medquad/strategies.png $(FIGURES)/strategies_medquad.png

# Container images (docs/deployment.md): CPU, and GPU (CUDA torch, faiss-gpu, onnxruntime-gpu). Needs a Docker engine.
image:
	docker build -t mrl-retrieval:cpu .

image-gpu:
	docker build --target gpu -t mrl-retrieval:gpu .

clean:
	rm -rf $(RUNS) .pytest_cache
