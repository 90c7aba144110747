#!/usr/bin/env bash
# The GPU figures in one run (about 8 minutes on one GPU): the GPU-marked tests, FAISS search per dim at 1M vectors,
# the encoders (torch float32 and bfloat16, ONNX Runtime on CUDA), /search and /v1/embeddings req/s at 1, 16 and 64
# in flight, and /search with 1, 2, 4 and 8 worker processes on the machine's CPU cores. Reports go to $OUT
# (runs/gpu-check); their tables are printed at the end.
#
#   scripts/gpu-check.sh             on a machine with an NVIDIA GPU: installs the gpu extra into .venv-gpu first
#   scripts/gpu-check.sh --dry-run   on any machine, CPU only: every step's command is checked by mrl's own parser,
#                                    and the steps that need no server run at toy sizes (the test suite runs this)
#
# What the machine has decides what is measured, and the first lines say so: FAISS without a GPU (faiss-cpu)
# searches on the CPU and the servers put only their encoder on the GPU (--device auto); ONNX Runtime without its
# CUDA provider leaves the ONNX encoder out.
#
# Environment: OUT (report folder), DATA (a BEIR folder: the queries and the corpus; default the bundled sample),
# INDEX (an index built from DATA; default: built into $OUT/index), MODEL (default: the base model), DIMS (the
# servers' dims, default 64,384), WORKERS (default 1,2,4,8), STEPS (the steps to run, default all of
# tests,scaling,encoders,latency,embeddings,workers; the index is built wherever INDEX has none), PYTHON (the interpreter whose mrl runs; default
# .venv-gpu/bin/python, or .venv/bin/python for --dry-run), SKIP_INSTALL=1 (use PYTHON as it is).
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

DIMS=${DIMS:-64,384}
STEPS=",${STEPS:-tests,scaling,encoders,latency,embeddings,workers},"
WORKERS=${WORKERS:-1,2,4,8}
if [ "$DRY_RUN" = 1 ]; then
  PYTHON=${PYTHON:-.venv/bin/python}
  SIZES=2000 QUERIES=20 SINGLE=5 TEXTS=4 BATCHES=1,4 REQUESTS=20 CONCURRENCY=1,4
else
  PYTHON=${PYTHON:-.venv-gpu/bin/python}
  SIZES=1000000 QUERIES=1000 SINGLE=100 TEXTS=1024 BATCHES=1,32,128 REQUESTS=1000 CONCURRENCY=1,16,64
  if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    echo "== installing the gpu extra into .venv-gpu (CUDA torch from PyPI, faiss-gpu, onnxruntime-gpu)"
    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install -q -e '.[gpu,dev]'
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

# What this interpreter sees: torch's CUDA, FAISS's GPUs, ONNX Runtime's CUDA provider, the CPU cores.
read -r TORCH_CUDA FAISS_GPUS ORT_CUDA CORES < <("$PYTHON" - <<'PY'
import os

import torch

import faiss

try:
    import onnxruntime

    ort_cuda = int("CUDAExecutionProvider" in onnxruntime.get_available_providers())
except ImportError:
    ort_cuda = 0
faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
print(int(torch.cuda.is_available()), faiss_gpus, ort_cuda, len(os.sched_getaffinity(0)))
PY
)
echo "== this machine: torch CUDA $TORCH_CUDA, FAISS GPUs $FAISS_GPUS, ONNX Runtime CUDA $ORT_CUDA, CPU cores $CORES"
if [ "$DRY_RUN" = 1 ]; then
  SEARCH_DEVICE=cpu SERVER_DEVICE=cpu KINDS=flat,ivf ENCODERS=torch,torch-bf16  # ONNX's export alone takes half a minute on a CPU
  SERVER_ENCODERS=torch,onnx PEER_FLAGS=""
else
  if [ "$TORCH_CUDA" != 1 ]; then echo "   torch sees no GPU: the encoder figures below are the CPU's" >&2; fi
  if [ "$FAISS_GPUS" -gt 0 ]; then
    SEARCH_DEVICE=gpu SERVER_DEVICE=gpu KINDS=flat,ivf
  else
    echo "   FAISS sees no GPU (faiss-cpu): flat search on the $CORES CPU cores; the servers encode on the GPU"
    SEARCH_DEVICE=cpu SERVER_DEVICE=auto KINDS=flat  # IVF's k-means at 1M takes minutes on a CPU
  fi
  if [ "$ORT_CUDA" = 1 ]; then
    ENCODERS=torch,torch-bf16,onnx SERVER_ENCODERS=torch,onnx PEER_FLAGS=""
  else
    echo "   ONNX Runtime has no CUDA provider (onnxruntime, not onnxruntime-gpu): no ONNX encoder figures"
    ENCODERS=torch,torch-bf16 SERVER_ENCODERS=torch PEER_FLAGS=--no-onnx
  fi
fi

# Each step: its name, the seconds it may take, the mrl command. A dry run checks servers' commands only.
step() {
  local name=$1 seconds=$2 needs_server=$3
  shift 3
  case "$STEPS" in *",$name,"*) ;; *) return 0 ;; esac
  echo "== $name"
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\0' "$@" >"$OUT/.command-$name"  # parsed with the others at the end, in one process
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

if [[ "$STEPS" == *",tests,"* ]]; then
  echo "== GPU-marked tests (skipped where FAISS and torch see no GPU)"
  mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)  # only their modules: the others need the dev extra
  if [ "$DRY_RUN" = 1 ]; then
    "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --co "${GPU_TESTS[@]}" >"$OUT/tests.log" 2>&1 || {
      tail -n 20 "$OUT/tests.log" >&2
      exit 1
    }
  else
    timeout 120 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -n 0 "${GPU_TESTS[@]}" >"$OUT/tests.log" 2>&1 ||
      FAILED="$FAILED tests"
  fi
  tail -n 3 "$OUT/tests.log"
fi

step scaling 150 0 bench scaling --device "$SEARCH_DEVICE" --sizes "$SIZES" --kinds "$KINDS" --queries "$QUERIES" \
  --single-queries "$SINGLE" --output "$OUT/scaling"
step encoders 90 0 bench encoders --device "$SERVER_DEVICE" --queries "$DATA" --encoders "$ENCODERS" \
  --batch-sizes "$BATCHES" --texts "$TEXTS" --output "$OUT/encoders"
if [ ! -e "$INDEX/current" ] && [ "$DRY_RUN" = 0 ]; then
  STEPS="${STEPS}index,"  # the servers need it
  step index 90 0 index build --data "$DATA" --index "$INDEX" --device "$SERVER_DEVICE" ${MODEL:+--model "$MODEL"}
fi
step latency 120 1 bench latency --index "$INDEX" --queries "$DATA" --encoders "$SERVER_ENCODERS" --dims "$DIMS" \
  --device "$SERVER_DEVICE" --concurrency "$CONCURRENCY" --requests "$REQUESTS" --output "$OUT/latency"
step embeddings 120 1 bench peers --index "$INDEX" --data "$DATA" --peers "" $PEER_FLAGS --device "$SERVER_DEVICE" \
  --concurrency "$CONCURRENCY" --requests "$REQUESTS" --output "$OUT/peers"
# What more cores buy: one server per worker count, all on the CPU (each worker gets cores/N encoder threads).
step workers 150 1 bench latency --index "$INDEX" --queries "$DATA" --encoders torch --dims "${DIMS%%,*}" \
  --device cpu --workers "$WORKERS" --concurrency 16,64 --requests "$REQUESTS" --no-in-process --output "$OUT/workers"

if [ "$DRY_RUN" = 1 ]; then  # every step's command through mrl's own parser: a renamed flag exits 2 here
  "$PYTHON" - "$OUT"/.command-* <<'PY'
import sys
from pathlib import Path

from mrl.cli import build_parser

parser = build_parser()
for path in sys.argv[1:]:
    parser.parse_args([arg.decode() for arg in Path(path).read_bytes().split(b"\0")[:-1]])
PY
  rm -f "$OUT"/.command-*
fi

for report in scaling/scaling.md encoders/encoders.md latency/latency.md peers/peers.md workers/latency.md; do
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
