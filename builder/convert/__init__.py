"""Conversions, one module each, named source2target.

Every ONNX-to-ONNX conversion is also a small command (`python -m builder.convert.onnx2int8 SRC DST`),
and the command that reproduces an artifact is recorded in the manifest next to it.
"""

from __future__ import annotations

import shlex
import sys

# precision -> module implementing `convert(src, dst, **options) -> None` on ONNX files
ONNX_PRECISIONS = {
    "fp16": "builder.convert.onnx2fp16",
    "int8": "builder.convert.onnx2int8",
    "int4": "builder.convert.onnx2int4",
}


def command(module: str, *args: str) -> str:
    """The shell line that reruns a conversion by hand (quoted; recorded, never executed by us)."""
    return shlex.join([sys.executable, "-m", module, *map(str, args)])
