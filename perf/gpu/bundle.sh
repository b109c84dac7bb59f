#!/usr/bin/env bash
# Prepare, on a connected machine, what the GPU machine lacks (it reaches no registry): a trimmed
# copy of the pip-bundled Triton server (python 3.12 stub only, no bundled libpython) and wheels.
# Output: .bundle/ (git-ignored), which `make bench-gpu` reads. Must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
SITE=$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
OUT=.bundle
rm -rf "$OUT" && mkdir -p "$OUT/wheels" "$OUT/stage/site/pytriton/tritonserver/python_backend_stubs"
T="$OUT/stage/site/pytriton/tritonserver"
cp -r "$SITE/pytriton/tritonserver/bin" "$SITE/pytriton/tritonserver/backends" "$T/"
cp -r "$SITE/pytriton/tritonserver/python_backend_stubs/3.12" "$T/python_backend_stubs/"
cp -r "$SITE/nvidia_pytriton.libs" "$OUT/stage/site/" && rm -f "$OUT"/stage/site/nvidia_pytriton.libs/libpython3*
tar -C "$OUT/stage" -cJf "$OUT/tritonserver.tar.xz" site
rm -rf "$OUT/stage"
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_38_x86_64 --platform any"
# the versions of requirements.lock, the environment the CPU suite passes with (the GPU machine's Python is
# 3.12, so the files differ, the versions do not)
pin() { local line; line=$(grep -m1 -iE "^$1==" requirements.lock) || { echo "error: $1 is not in requirements.lock" >&2; exit 1; }
        echo "${line%% *}"; }
# numpy<2 for the python backend stub; perf_analyzer 2.60 (glibc 2.38; not in the lock: the CPU machine's
# glibc 2.36 cannot run it); the pure-python tritonclient (gRPC client + model_config_pb2; the GPU image has
# grpcio and protobuf); pydantic for the spec.
$VENV/bin/python -m pip download -q --no-deps $PLAT -d "$OUT/wheels" \
  "$(pin numpy)" perf-analyzer==2.60.0 "$(pin pydantic)" "$(pin pydantic-core)" "$(pin annotated-types)" \
  "$(pin typing-inspection)" "$(pin python-rapidjson)" 2>&1 | grep -v "^WARNING: Location" || true
# torchao: weight-only int8/int4 of the LLM runtime (0.17 is built for torch 2.11, the GPU machine's)
$VENV/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  -d "$OUT/wheels" "$(pin torchao)" 2>&1 | grep -v "^WARNING: Location" || true
# pytest: the tests marked gpu run there too (perf/gpu/gpu_tests.sh)
$VENV/bin/python -m pip download -q --no-deps --only-binary=:all: --platform any --python-version 3.12 \
  -d "$OUT/wheels" "$(pin tritonclient)" "$(pin pytest)" "$(pin pluggy)" "$(pin iniconfig)" 2>&1 | grep -v "^WARNING: Location" || true
du -sh "$OUT"/* | sed 's/^/  /'
total=$(du -sm "$OUT" | cut -f1)
echo "bundle: $OUT ($total MiB)"
[ "$total" -lt 60 ] || { echo "error: bundle is $total MiB; the device takes 64 MiB with the working tree" >&2; exit 1; }
