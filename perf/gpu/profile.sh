#!/usr/bin/env bash
# Issue 13's GPU profile, on the GPU machine after perf/gpu/bench.sh has prepared its work folder (server,
# wheels, stub environment): build perf/gpu/profile.yaml (BERT-base fp32 and fp16 eager), profile both at
# batch 1 and 64, then `profile --try` on the fp32 eager variant (its top advice, rebuilt and measured
# before/after at concurrency 1 and 64). Usage: perf/gpu/profile.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: profile.sh OUT_DIR}
W=${BENCH_WORK:-/tmp/triton-builder-bench}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$W/extra" PATH="$W/extra/bin:$PATH" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
$PY -m builder.cli build perf/gpu/profile.yaml -o "$W/profile-repo"
$PY -m builder.cli profile "$W/profile-repo" --out "$OUT/profile" --batch 1 --batch 64
$PY -m builder.cli profile "$W/profile-repo" --model bert_torch_fp32 --out "$OUT/profile-try" --batch 1 \
  --try --concurrency 1,64 --gpus --tritonserver "$W/site/pytriton/tritonserver/bin/tritonserver" \
  --stub-python "$W/stub/bin/python3"
