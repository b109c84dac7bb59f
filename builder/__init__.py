"""triton-builder: PyTorch / Hugging Face models -> a verified, measured Triton model repository."""

from importlib import metadata

try:
    __version__ = metadata.version("triton-builder")
except metadata.PackageNotFoundError:  # run from a source tree (e.g. the GPU bench), not installed
    __version__ = "0.1.0+source"

# torchao (weight-only int8/int4 of the generation runtime) logs its CUDA-only extensions failing to load on a
# CPU-only torch, and torch warns about torchao's pytree registrations: noise in every build, not errors
import logging  # noqa: E402

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
