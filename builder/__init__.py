"""triton-builder: PyTorch / Hugging Face models -> a verified, measured Triton model repository."""

from importlib import metadata

try:
    __version__ = metadata.version("triton-builder")
except metadata.PackageNotFoundError:  # run from a source tree (e.g. the GPU bench), not installed
    __version__ = "0.1.0+source"
