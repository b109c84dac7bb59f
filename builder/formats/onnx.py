"""Format `onnx`: torch -> ONNX (fp32), then onnx2fp16 / onnx2int8 / onnx2int4; onnxruntime runs it,
in the python backend or Triton's onnxruntime backend (`runtime: native`)."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from builder.errors import RunError, root_reason
from builder.formats.base import Format, register

ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32", 9: "TYPE_BOOL", 2: "TYPE_UINT8",
                  3: "TYPE_INT8", 11: "TYPE_FP64", 16: "TYPE_BF16", 8: "TYPE_STRING"}


def fp32_onnx(job) -> Path:
    """The fp32 export every ONNX-based variant of a part starts from (made once per part)."""
    from builder.convert import torch2onnx

    if not job.fp32_onnx.exists():
        torch2onnx.export(job.part, job.example, job.fp32_onnx)
    return job.fp32_onnx


def export(job) -> tuple[Path, str]:
    from builder import convert

    src = fp32_onnx(job)
    dst = job.version_dir / "model.onnx"
    variant = job.variant
    if variant.precision == "fp32":
        for f in src.parent.glob("model.onnx*"):
            shutil.copy2(f, job.version_dir / f.name)
        return dst, job.rebuild
    module = convert.ONNX_PRECISIONS[variant.precision]
    conv = importlib.import_module(module)
    try:
        if variant.precision == "int8":
            static = variant.calibration == "static"
            kept = conv.convert(src, dst, variant.calibration, job.calibration() if static else None,
                                min_cosine=variant.effective_tolerance.min_cosine if static else None)
            if kept:
                job.ctx.console.print(f"  {job.name}: {len(kept)} MatMul/Gemm nodes kept in fp32 (int8 of their "
                                      "inputs missed the tolerance on the calibration batches)")
        else:
            conv.convert(src, dst)
    except Exception as exc:
        raise RunError(f"{module.rsplit('.', 1)[1]} failed: {root_reason(exc)}") from exc
    if variant.calibration == "static":  # its calibration inputs come from the spec's model: rebuild through it
        return dst, job.rebuild
    extra = ["--calibration", "dynamic"] if variant.precision == "int8" else []
    return dst, f"{job.rebuild}  # fp32 export, then: {convert.command(module, src.name, dst.name, *extra)}"


def runner(path: Path, sig, precision: str, device: str):
    from builder import verify

    return verify.OnnxRunner(path)


def check(path: Path, cfg, name: str) -> list[str]:
    """The ONNX graph's inputs/outputs against the config: names, dtypes and ranks."""
    import onnx
    from tritonclient.grpc import model_config_pb2

    graph = onnx.load(str(path), load_external_data=False).graph
    batch = 1 if cfg.max_batch_size > 0 else 0
    problems = []
    for kind, declared, actual in (("input", cfg.input, graph.input), ("output", cfg.output, graph.output)):
        found = {v.name: v for v in actual}
        for t in declared:
            v = found.get(t.name)
            if v is None:
                problems.append(f"{name}: {kind} {t.name} is not in {path.name} (it has {', '.join(found)})")
                continue
            want = model_config_pb2.DataType.Name(t.data_type)
            got = ONNX_TO_TRITON.get(v.type.tensor_type.elem_type, "?")
            if want != got:
                problems.append(f"{name}: {kind} {t.name} is {want} in config.pbtxt but {got} in {path.name}")
            rank = len(v.type.tensor_type.shape.dim)
            if rank != len(t.dims) + batch:
                problems.append(f"{name}: {kind} {t.name} has rank {len(t.dims) + batch} in config.pbtxt but {rank} in {path.name}")
    return problems


ONNX = register(Format(
    name="onnx", artifact="model.onnx", export=export, runner=runner, python_runner="onnx", check=check,
    refused={"bf16": "onnxruntime's CPU provider has no bf16 kernels for these models; use fp16, or format torch "
                     "with bf16"},
    native=dict(platform="onnxruntime_onnx", backend="onnxruntime", default_model_filename="model.onnx"),
))
