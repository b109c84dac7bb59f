"""ONNX fp32 -> int8 with onnxruntime.quantization: dynamic, or static QDQ calibrated on real inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

EXTERNAL_DATA_BYTES = 1 << 30  # above this, weights go to <model>.onnx.data (protobuf's 2 GiB limit)


def convert(src: Path, dst: Path, calibration: str = "dynamic", samples: list[dict[str, np.ndarray]] | None = None) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_dynamic, quantize_static)

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns per 1-D weight on the root logger
    prepared = dst.with_name(dst.stem + ".prep.onnx")
    external = large(src)
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location=prepared.name + ".data")
    drop_initializer_shapes(prepared, external)
    try:
        if calibration == "dynamic":
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=external)
            return
        if not samples:
            raise ValueError("static int8 needs calibration samples")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(samples)

            def get_next(self):
                return next(self._it, None)

        quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=external)
    finally:
        for f in prepared.parent.glob(prepared.name + "*"):
            f.unlink(missing_ok=True)


def large(path: Path) -> bool:
    """Whether a model needs external data (protobuf's 2 GiB limit): its file and its weights' files."""
    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())
    return size > EXTERNAL_DATA_BYTES


def drop_initializer_shapes(path: Path, external: bool) -> None:
    """The exporter records value_info for weights too (a classifier's [classes, hidden] weight of a Gemm
    with transB). The quantizer rewrites such weights and then re-runs shape inference, which fails on
    the stale record ("Inferred shape and existing shape differ in dimension 0"). Weights carry their own
    shapes: drop their value_info."""
    import onnx

    model = onnx.load(str(path))
    weights = {i.name for i in model.graph.initializer}
    keep = [v for v in model.graph.value_info if v.name not in weights]
    if len(keep) == len(model.graph.value_info):
        return
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    for f in path.parent.glob(path.name + "*"):
        f.unlink()
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--calibration", choices=["dynamic"], default="dynamic",
                        help="static needs calibration inputs: rebuild through the spec")
    args = parser.parse_args()
    convert(args.src, args.dst, args.calibration)
