#!/usr/bin/env bash
# The tests marked `gpu` on the GPU machine (no registry there): pytest and the spec's pydantic from the bundle.
# Usage: perf/gpu/gpu_tests.sh [pytest args]   (after `make bench-bundle`; carry .bundle)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
T=${BENCH_WORK:-/tmp/triton-builder-tests}/site
rm -rf "$T" && mkdir -p "$T"
$PY -m pip install -q --no-index --no-deps --no-compile --target "$T" \
  .bundle/wheels/{pytest,pluggy,iniconfig,pydantic,pydantic_core,annotated_types,typing_inspection}-*.whl
PYTHONPATH="$PWD:$T" exec $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_generation.py tests/test_paged.py "$@"
