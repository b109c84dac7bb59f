"""NGC Triton releases: what each `nvcr.io/nvidia/tritonserver:<tag>-*` image carries, in one table.

Every path that names an image reads it: the deploy Dockerfile and its pinned packages, the TensorRT
conversion (which TensorRT an engine will meet), the vLLM and TensorRT-LLM targets, the docker runtime.

    RELEASES["26.07"].vllm                    # '0.24.0'
    image("26.07", "vllm")                    # 'nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3'
    release_of("nvcr.io/nvidia/tritonserver:26.07-py3").triton   # '2.71.0'

Sources, read 2026-12 (a fact not published in them is None, never guessed):
- COMPAT: triton-inference-server/server docs/introduction/compatibility.md at commit
  e1db8a603d863b1317ee859bdeea2be19959462e (2026-08-19): per tag the Python, TensorRT and TensorRT-LLM of
  the -trtllm-python-py3 image, the vLLM of the -vllm-python-py3 image, and the ONNX Runtime version
  (stored as tests/fixtures/deploy_ngc/compatibility.md; tests/test_deploy_ngc.py checks the table against it).
- Server versions: the server repository's release tags v2.49.0 to v2.71.0, whose build.py names the
  container (`"triton_container_version": "26.07"` in v2.71.0); the README at the commit above says
  "The current release is version 2.71.0 and corresponds to the 26.07 container release".
- TensorRT of the plain -py3 image: NVIDIA's Frameworks Support Matrix (24.08 to 25.02), and the CUDA DL
  26.03 release notes (the base the server's build.py names as upstream_container_version). For the other
  tags no published number was found: `tensorrt` is None and a TensorRT engine is then only accepted in
  the very image that built it (builder.convert.onnx2trt.check_repository).
- STUB: triton-inference-server/python_backend CMakeLists.txt on the release branches: r24.10 builds the
  stub with pybind11 v2.10.0, r24.11 to r26.07 with v2.12.0 (PR #384, 2024-11-01), the first pybind11
  that supports NumPy 2 (pybind11 2.12.0 release notes). Hence numpy < 2 only up to 24.10.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from builder.errors import UserError

REGISTRY = "nvcr.io/nvidia/tritonserver"
FLAVOURS = {"py3": "-py3", "vllm": "-vllm-python-py3", "trtllm": "-trtllm-python-py3"}
TAG = re.compile(r":(\d\d\.\d\d)-[\w-]*py3$")


@dataclass(frozen=True)
class Release:
    tag: str
    triton: str  # server version
    python: str  # the python backend's Python (major.minor)
    tensorrt: str | None  # TensorRT of the plain -py3 image (trtexec, the tensorrt backend)
    trtllm_tensorrt: str | None  # TensorRT of the -trtllm-python-py3 image
    tensorrt_llm: str | None
    vllm: str | None
    onnxruntime: str | None
    stub_numpy2: bool  # the python backend stub accepts NumPy 2 (built with pybind11 >= 2.12)


def _r(tag, triton, python, tensorrt, trtllm_tensorrt, tensorrt_llm, vllm, onnxruntime, stub_numpy2=True):
    return Release(tag, triton, python, tensorrt, trtllm_tensorrt, tensorrt_llm, vllm, onnxruntime, stub_numpy2)


RELEASES = {r.tag: r for r in (
    #  tag      triton    Python  TensorRT (py3)  TensorRT (trtllm)  TRT-LLM        vLLM       ORT
    _r("24.08", "2.49.0", "3.10", "10.3.0", "10.3.0", "0.12.0", "0.5.0.post1", "1.18.1", stub_numpy2=False),
    _r("24.09", "2.50.0", "3.10", "10.4.0", "10.4.0", "0.13.0", "0.5.3.post1", "1.19.2", stub_numpy2=False),
    _r("24.10", "2.51.0", "3.10", "10.5.0", "10.4.0", "0.14.0", "0.5.5", "1.19.2", stub_numpy2=False),
    _r("24.11", "2.52.0", "3.10", "10.6.0", "10.6.0", "0.15.0", "0.5.5", "1.19.2"),
    _r("24.12", "2.53.0", "3.12", "10.7.0", "10.7.0", "0.16.0", "0.5.5", "1.20.1"),
    _r("25.01", "2.54.0", "3.12", "10.8.0", "10.8.0.43", "0.17.0", "0.6.3.post1", "1.20.1"),
    _r("25.02", "2.55.0", "3.12", "10.8.0", "10.8.0.43", "0.17.0.post1", "0.7.0", "1.20.1"),
    _r("25.03", "2.56.0", "3.12", None, "10.9.0.34", "0.18.0", "0.7.3", "1.21.0"),
    _r("25.04", "2.57.0", "3.12", None, "10.9.0.34", "0.18.2", "0.8.1", "1.21.0"),
    _r("25.05", "2.58.0", "3.12", None, "10.9.0.34", "0.19.0", "0.8.4", "1.22.0"),
    _r("25.06", "2.59.0", "3.12", None, "10.10.0.31", "0.20.0", "0.9.0rc1", "1.22.0"),
    _r("25.07", "2.59.1", "3.12", None, "10.10.0.31", "0.20.0", "0.9.0rc1", "1.22.0"),
    _r("25.08", "2.60.0", "3.12", None, "10.11.0.33", "0.21.0", "0.9.2", "1.23.0"),
    _r("25.09", "2.61.0", "3.12", None, "10.11.0.33", "1.0.0", "0.10.1.1", "1.23.0"),
    _r("25.10", "2.62.0", "3.12", None, "10.11.0.33", "1.0.0", "0.10.2", "1.23.1"),
    _r("25.11", "2.63.0", "3.12", None, "10.13.3.9", "1.0.3.2510", "0.11.0", "1.23.2"),
    _r("25.12", "2.64.0", "3.12", None, "10.13.3.9", "1.1.0", "0.11.1", "1.23.2"),
    _r("26.01", "2.65.0", "3.12", None, "10.13.3.9", "1.1.0", "0.13.0", "1.23.2"),
    _r("26.02", "2.66.0", "3.12", None, "10.13.3.9", "1.1.0", "0.15.1", "1.24.1"),
    _r("26.03", "2.67.0", "3.12", "10.16.0.72", "10.14.1.48", "1.2.0", "0.17.1", "1.24.2"),
    _r("26.04", "2.68.0", "3.12", None, "10.14.1.48", "1.2.1", "0.19.0", "1.24.4"),
    _r("26.05", "2.69.0", "3.12", None, "10.14.1.48", "1.2.1", "0.19.0", "1.24.4"),
    _r("26.06", "2.70.0", "3.12", None, "10.14.1.48", "1.2.1", "0.22.1", "1.24.4"),
    _r("26.07", "2.71.0", "3.12", None, "10.14.1.48", "1.2.1", "0.24.0", "1.27.0"),
)}
# The newest tag whose facts were checked in the sources above (26.08 = Triton 2.72.0 exists, but its
# component versions were not in them).
DEFAULT_TAG = "26.07"
# The server bundled in nvidia-pytriton 0.7.0 (`serve --runtime local` here): Triton 2.51 = 24.10.
EMBEDDED_TAG = "24.10"

# What the python-backend models import, pinned per image Python. Each pin was checked to have a
# manylinux wheel for that Python (`pip install --dry-run --only-binary=:all: --python-version X`).
PINS = {
    "3.10": {"numpy": "1.26.4", "onnxruntime": "1.23.2", "onnxruntime-gpu": "1.23.2", "torch": "2.13.0",
             "tokenizers": "0.23.3", "safetensors": "0.8.0", "pillow": "12.0.0"},
    "3.12": {"numpy": "2.4.6", "onnxruntime": "1.27.0", "onnxruntime-gpu": "1.27.0", "torch": "2.13.0",
             "tokenizers": "0.23.3", "safetensors": "0.8.0", "pillow": "12.0.0"},
}
NUMPY_1 = "1.26.4"  # for a stub built before pybind11 2.12


def image(tag: str = DEFAULT_TAG, flavour: str = "py3") -> str:
    return f"{REGISTRY}:{tag}{FLAVOURS[flavour]}"


DEFAULT_IMAGE = image()
VLLM_IMAGE = image(flavour="vllm")
TRTLLM_IMAGE = image(flavour="trtllm")


def tag_of(name: str) -> str | None:
    match = TAG.search(name or "")
    return match.group(1) if match else None


def release_of(name: str) -> Release | None:
    """The table's row for an image name (any flavour), None for a tag not in it."""
    return RELEASES.get(tag_of(name) or "")


def flavour_of(name: str) -> str:
    return next((f for f, suffix in FLAVOURS.items() if f != "py3" and name.endswith(suffix)), "py3")


def tensorrt(name: str) -> str | None:
    """The TensorRT an engine meets in this image (the -trtllm image has its own), when published."""
    row = release_of(name)
    if row is None:
        return None
    return row.trtllm_tensorrt if flavour_of(name) == "trtllm" else row.tensorrt


def pins(name: str) -> dict[str, str]:
    """Pinned versions of the packages the python models import, for this image's Python and stub."""
    row = release_of(name)
    if row is None:
        raise UserError(f"image {name}: tag not in the NGC release table ({', '.join(sorted(RELEASES))}); "
                        f"choose one of those (default {DEFAULT_TAG})")
    found = dict(PINS[row.python])
    if not row.stub_numpy2:
        found["numpy"] = NUMPY_1
    return found
