#!/usr/bin/env bash
# The GPU figures in one run (about 8 minutes on one GPU): the GPU-marked tests, FAISS GPU search per dim at
# 1M vectors, the encoders (torch float32 and bfloat16, ONNX Runtime on CUDA), and /search and /v1/embeddings
# req/s at 1, 16 and 64 in flight. Reports go to $OUT (runs/gpu-check); their tables are printed at the end.
#
#   scripts/gpu-check.sh             on a machine with an NVIDIA GPU: installs the gpu extra into .venv-gpu first
#   scripts/gpu-check.sh --dry-run   on any machine, CPU only: every step's command is checked by mrl's own parser,
#                                    and the steps that need no server run at toy sizes (the test suite runs this)
#
# Environment: OUT (report folder), DATA (a BEIR folder: the queries and the corpus; default the bundled sample),
# INDEX (an index built from DATA; default: built into $OUT/index), MODEL (default: the base model),
# PYTHON (the interpreter whose mrl runs; default .venv-gpu/bin/python, or .venv/bin/python for --dry-run),
# SKIP_INSTALL=1 (use PYTHON as it is).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; elif [ $# -gt 0 ]; then
  echo "usage: scripts/gpu-check.sh [--dry-run]" >&2
  exit 2
fi
OUT=${OUT:-runs/gpu-check}
DATA=${DATA:-data/sample_medical}
INDEX=${INDEX:-$OUT/index}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

if [ "$DRY_RUN" = 1 ]; then
  PYTHON=${PYTHON:-.venv/bin/python}
  DEVICE=cpu SIZES=5000 QUERIES=20 SINGLE=5 TEXTS=4 BATCHES=1,4 REQUESTS=20 CONCURRENCY=1,4
  ENCODERS=torch,torch-bf16  # ONNX's export alone takes half a minute on a CPU
else
  PYTHON=${PYTHON:-.venv-gpu/bin/python}
  DEVICE=gpu SIZES=1000000 QUERIES=1000 SINGLE=100 TEXTS=1024 BATCHES=1,32,128 REQUESTS=1000 CONCURRENCY=1,16,64
  ENCODERS=torch,torch-bf16,onnx
  if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    echo "== installing the gpu extra into .venv-gpu (CUDA torch from PyPI, faiss-gpu, onnxruntime-gpu)"
    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install -q -e '.[gpu,dev]'
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

# Each step: its name, the seconds it may take, the mrl command. A dry run checks servers' commands only.
step() {
  local name=$1 seconds=$2 needs_server=$3
  shift 3
  echo "== $name"
  if [ "$DRY_RUN" = 1 ]; then
    "$PYTHON" -c 'import sys; from mrl.cli import build_parser; build_parser().parse_args(sys.argv[1:])' "$@"
    if [ "$needs_server" = 1 ]; then echo "   (dry run: command checked, not run)"; return 0; fi
  fi
  local status=0
  timeout "$seconds" "$PYTHON" -m mrl "$@" >"$OUT/$name.log" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    echo "   $name failed (exit $status; 124: past its ${seconds}s): tail of $OUT/$name.log" >&2
    tail -n 20 "$OUT/$name.log" >&2
    FAILED="$FAILED $name"
  fi
}
FAILED=""

echo "== GPU-marked tests (skipped where FAISS and torch see no GPU)"
if [ "$DRY_RUN" = 1 ]; then
  "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --co tests >"$OUT/tests.log" 2>&1 || {
    tail -n 20 "$OUT/tests.log" >&2
    exit 1
  }
else
  timeout 120 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -n 0 tests >"$OUT/tests.log" 2>&1 || FAILED="$FAILED tests"
fi
tail -n 3 "$OUT/tests.log"

step scaling 150 0 bench scaling --device "$DEVICE" --sizes "$SIZES" --kinds flat,ivf --queries "$QUERIES" \
  --single-queries "$SINGLE" --output "$OUT/scaling"
step encoders 90 0 bench encoders --device "$DEVICE" --queries "$DATA" --encoders "$ENCODERS" \
  --batch-sizes "$BATCHES" --texts "$TEXTS" --output "$OUT/encoders"
if [ ! -e "$INDEX/current" ] && [ "$DRY_RUN" = 0 ]; then
  step index 90 0 index build --data "$DATA" --index "$INDEX" --device "$DEVICE" ${MODEL:+--model "$MODEL"}
fi
step latency 120 1 bench latency --index "$INDEX" --queries "$DATA" --encoders torch,onnx --device "$DEVICE" \
  --concurrency "$CONCURRENCY" --requests "$REQUESTS" --output "$OUT/latency"
step embeddings 120 1 bench peers --index "$INDEX" --data "$DATA" --peers "" --device "$DEVICE" \
  --concurrency "$CONCURRENCY" --requests "$REQUESTS" --output "$OUT/peers"

for report in scaling/scaling.md encoders/encoders.md latency/latency.md peers/peers.md; do
  if [ -f "$OUT/$report" ]; then
    echo
    cat "$OUT/$report"
  fi
done
if [ -n "$FAILED" ]; then
  echo "gpu-check: failed:$FAILED" >&2
  exit 1
fi
echo "gpu-check: done; reports in $OUT"
