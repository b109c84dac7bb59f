"""ONNX fp32 -> int4 weight-only (MatMulNBits, block-wise symmetric), activations stay float."""

from __future__ import annotations

import argparse
from pathlib import Path


def convert(src: Path, dst: Path, block_size: int = 32) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=quantizer.model.model.ByteSize() > (1 << 30))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args()
    convert(args.src, args.dst, args.block_size)
