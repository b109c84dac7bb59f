#!/usr/bin/env bash
# The whole GPU measurement in one go, on a GPU machine with no registry access (see docs/PERFORMANCE.md).
# Usage: perf/gpu/bench.sh RESULTS_DIR [driver args]   (after `make bench-bundle` on a connected machine)
# DRIVER=perf/gpu/llm_bench.py runs the LLM bench instead of the encoder one (make bench-gpu-llm).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: bench.sh RESULTS_DIR}
PY=${PYTHON:-python3}
B=.bundle
W=${BENCH_WORK:-/tmp/triton-builder-bench}
[ -f "$B/tritonserver.tar.xz" ] || { echo "error: no $B/; run 'make bench-bundle' on a connected machine" >&2; exit 2; }
if [ "${MPS:-0}" = 1 ] && ! command -v nvidia-cuda-mps-control >/dev/null; then
  echo "error: MPS=1 but nvidia-cuda-mps-control is not on PATH; run without MPS=1 or install the NVIDIA driver's MPS tools" >&2
  exit 2
fi
rm -rf "$W" && mkdir -p "$W" "$OUT"
tar -xJf "$B/tritonserver.tar.xz" -C "$W"
$PY -m pip install -q --no-index --no-deps --no-compile --target "$W/extra" \
  "$B"/wheels/{pydantic,pydantic_core,annotated_types,typing_inspection,tritonclient,perf_analyzer,python_rapidjson,torchao}-*.whl
# the stub's environment: numpy<2 (python backend), torch seen through a .pth file
$PY -m venv "$W/stub"
# torchao too: the served int8/int4 variants quantize in the stub (PYTHONPATH below is the driver's, not the stub's)
"$W/stub/bin/pip" install -q --no-index --no-deps "$B"/wheels/numpy-*.whl "$B"/wheels/torchao-*.whl
STUB_SITE=$("$W/stub/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
$PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$STUB_SITE/host-packages.pth"
export PYTHONPATH="$PWD:$W/extra" PATH="$W/extra/bin:$PATH" PYTHONUNBUFFERED=1
# MPS=1: the server's instances share the GPU through CUDA MPS (each python-backend instance is a process with
# its own CUDA context; without MPS their kernels take turns on the GPU, with it they run side by side)
if [ "${MPS:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY="$W/mps-pipe" CUDA_MPS_LOG_DIRECTORY="$W/mps-log"
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d
  trap 'echo quit | nvidia-cuda-mps-control; cat "$CUDA_MPS_LOG_DIRECTORY"/control.log > "$OUT/mps-control.log" 2>/dev/null' EXIT
  # a client through the daemon before the bench: a daemon that cannot start its server fails here, in one line
  $PY -c 'import torch; torch.ones(1, device="cuda").sum().item()' \
    || { echo "error: MPS=1 but a CUDA client could not start through the MPS daemon (see $OUT/mps-control.log)" >&2; exit 2; }
  echo "CUDA MPS on (pipe $CUDA_MPS_PIPE_DIRECTORY; servers: $(echo get_server_list | nvidia-cuda-mps-control | tr '\n' ' '))"
fi
$PY "${DRIVER:-perf/gpu/bench.py}" --out "$OUT" --work "$W" \
  --tritonserver "$W/site/pytriton/tritonserver/bin/tritonserver" --stub-python "$W/stub/bin/python3" "${@:2}"
