"""ONNX fp32 -> int8 with onnxruntime.quantization: dynamic, or static QDQ calibrated on real inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def convert(src: Path, dst: Path, calibration: str = "dynamic", samples: list[dict[str, np.ndarray]] | None = None) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_dynamic, quantize_static)

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns per 1-D weight on the root logger
    prepared = dst.with_name(dst.stem + ".prep.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    try:
        if calibration == "dynamic":
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, per_channel=True)
            return
        if not samples:
            raise ValueError("static int8 needs calibration samples")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(samples)

            def get_next(self):
                return next(self._it, None)

        quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--calibration", choices=["dynamic"], default="dynamic",
                        help="static needs calibration inputs: rebuild through the spec")
    args = parser.parse_args()
    convert(args.src, args.dst, args.calibration)
