"""ONNX fp32 -> int8 with onnxruntime.quantization: dynamic, or static QDQ calibrated on real inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

EXTERNAL_DATA_BYTES = 1 << 30  # above this, weights go to <model>.onnx.data (protobuf's 2 GiB limit)
# static QDQ: the weight-heavy ops only. Quantizing the arithmetic on position ids (MPNet: cumsum of the
# mask, then Gather) turned indices into garbage; elementwise ops gain little from int8 anyway.
STATIC_OPS = ["MatMul", "Gemm", "Conv"]

# onnxruntime's quantizer settings per scheme. Without VNNI (AVX2 only) onnxruntime's u8 x s8 GEMM adds
# pairs of products in saturating 16-bit sums (vpmaddubsw): 255 * 127 * 2 overflows, so an 8-bit weight
# gives different, worse numbers there than on a VNNI CPU. 7-bit weights (reduce_range) cannot overflow
# (255 * 63 * 2 < 32767), so those numbers are the same on every x86 CPU: the default for both
# calibrations (perf/int8_schemes.py measures every scheme; docs/PERFORMANCE.md has the table).
SCHEMES = {
    "dynamic-reduce-range": {"per_channel": True, "reduce_range": True, "weight_type": "QInt8"},
    "dynamic-s8": {"per_channel": True, "reduce_range": False, "weight_type": "QInt8"},
    "dynamic-u8u8": {"per_channel": True, "reduce_range": False, "weight_type": "QUInt8"},
    "static-reduce-range": {"per_channel": True, "reduce_range": True, "weight_type": "QInt8",
                            "activation_type": "QUInt8"},
    "static-s8": {"per_channel": True, "reduce_range": False, "weight_type": "QInt8", "activation_type": "QUInt8"},
    "static-s8s8": {"per_channel": True, "reduce_range": False, "weight_type": "QInt8", "activation_type": "QInt8",
                    "extra_options": {"ActivationSymmetric": True}},
}
DEFAULT_SCHEME = {"dynamic": "dynamic-reduce-range", "static": "static-reduce-range"}


def convert(src: Path, dst: Path, calibration: str = "dynamic", samples: list[dict[str, np.ndarray]] | None = None,
            scheme: str | None = None, min_cosine: float | None = None) -> list[str]:
    """Quantize `src` into `dst`. Static: with `min_cosine`, the MatMul/Gemm nodes whose inputs int8 fits
    worst stay fp32 until the calibration batches' outputs reach it (see keep_fp32). Returns those nodes."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    import logging

    scheme = scheme or DEFAULT_SCHEME[calibration]
    if not scheme.startswith(calibration):
        raise ValueError(f"scheme {scheme} is not a {calibration} scheme")
    options = dict(SCHEMES[scheme])
    options["weight_type"] = QuantType[options["weight_type"]]
    if "activation_type" in options:
        options["activation_type"] = QuantType[options["activation_type"]]
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns per 1-D weight on the root logger
    prepared = dst.with_name(dst.stem + ".prep.onnx")
    external = large(src)
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location=prepared.name + ".data")
    drop_initializer_shapes(prepared, external)
    try:
        if calibration == "dynamic":
            quantize_dynamic(str(prepared), str(dst), use_external_data_format=external, **options)
            return []
        if not samples:
            raise ValueError("static int8 needs calibration samples")
        if min_cosine is None or external:  # the search runs the model with extra outputs: protobuf's 2 GiB
            _quantize_static(prepared, dst, samples, options, [], external)
            return []
        return keep_fp32(prepared, dst, samples, options, min(min_cosine + STATIC_MARGIN, 1.0))
    finally:
        for f in prepared.parent.glob(prepared.name + "*"):
            f.unlink(missing_ok=True)


# static QDQ scales each activation by its calibrated range, one scale per tensor: a tensor with outliers
# (BERT-family FFN inputs after GELU reach 10x their 99.9th percentile) puts most of its values in a few
# levels. MiniLM quantized that way gives cosine 0.89 on any CPU. Such nodes stay fp32, worst first, in
# growing shares of all MatMul/Gemm nodes, until batches held out of the calibration are within the
# tolerance plus this margin (held out: scales fitted to a batch flatter the check on that same batch; the
# verification then judges fresh batches).
STATIC_MARGIN = 0.01
FP32_SHARES = (0, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 1)


def keep_fp32(prepared: Path, dst: Path, samples: list[dict], options: dict, target: float) -> list[str]:
    import math

    import onnx
    import onnxruntime as ort

    from builder.spec import Tolerance
    from builder.verify import compare

    tol = Tolerance(min_cosine=target)
    model = onnx.load(str(prepared))
    weights = {i.name for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in STATIC_OPS]
    inputs = {n.name: next((i for i in n.input if i not in weights), n.input[0]) for n in nodes}
    final = [o.name for o in model.graph.output]
    for name in dict.fromkeys(inputs.values()):
        if name not in final:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = [{i.name: s[i.name] for i in session.get_inputs()} for s in samples]
    runs = [dict(zip([o.name for o in session.get_outputs()], session.run(None, f))) for f in feeds]
    order = sorted(nodes, key=lambda n: int8_fit_db(np.concatenate([r[inputs[n.name]].ravel() for r in runs])))
    held = max(1, len(samples) // 4) if len(samples) > 1 else 0
    fit = samples[:len(samples) - held]
    checks = list(zip(feeds, runs))[len(samples) - held:] or list(zip(feeds, runs))
    excluded: list[str] = []
    for step in sorted({math.ceil(len(nodes) * share) for share in FP32_SHARES}):
        excluded = [n.name for n in order[:step]]
        _quantize_static(prepared, dst, fit, options, excluded, False)
        quantized = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        worst = min(compare(name, got, r[name], tol, f.get("attention_mask")).cosine for f, r in checks
                    for name, got in zip(final, quantized.run(final, f)))
        if worst >= target:
            break
    if held:  # the chosen nodes, calibrated on every batch
        _quantize_static(prepared, dst, samples, options, excluded, False)
    return excluded


def int8_fit_db(x: np.ndarray) -> float:
    """Signal-to-noise (dB) of `x` through a u8 quantize-dequantize over its own range, as static QDQ does."""
    x = x.astype(np.float64)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / scale)
    err = x - (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    return float(10 * np.log10(max((x ** 2).sum(), 1e-30) / max((err ** 2).sum(), 1e-30)))


def _quantize_static(prepared: Path, dst: Path, samples: list[dict], options: dict, exclude: list[str],
                     external: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(samples)

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=STATIC_OPS,
                    nodes_to_exclude=exclude, use_external_data_format=external, **options)


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
    parser.add_argument("--scheme", choices=[s for s in SCHEMES if s.startswith("dynamic")],
                        default=DEFAULT_SCHEME["dynamic"])
    args = parser.parse_args()
    convert(args.src, args.dst, args.calibration, scheme=args.scheme)
