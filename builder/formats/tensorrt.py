"""Format `tensorrt`: an engine (`model.plan`) built by trtexec from the fp32 ONNX export, in the serving
NGC image (builder.convert.onnx2trt); Triton's tensorrt backend serves it (`runtime: native` only).
Verified with trtexec where it was built; ensembles cannot run it in-process here."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from builder.errors import UserError
from builder.formats.base import Format, register


def preflight(where: str, runtime: str) -> None:
    from builder.convert import onnx2trt

    if runtime != "native":
        raise UserError(f"{where}: format tensorrt is served by Triton's tensorrt backend; set runtime: native "
                        "(or --runtime native)")
    onnx2trt.check_available(where)


def export(job) -> tuple[Path, str]:
    from builder.convert import onnx2trt
    from builder.formats.onnx import fp32_onnx

    src = fp32_onnx(job)
    shapes = onnx2trt.profile_shapes(job.part.inputs, job.sig.max_batch_size, job.part.batch_in_dims)
    record = onnx2trt.build_engine(src, job.version_dir / "model.plan", job.variant.precision, shapes)
    return job.version_dir / "model.plan", shlex.join(record["command"])


def runner(path: Path, sig, precision: str, device: str):
    from builder.convert import onnx2trt

    return lambda feeds: onnx2trt.run_engine(path, feeds)  # trtexec, where it built


def check(path: Path, cfg, name: str) -> list[str]:
    return []  # an engine is opaque here; serve checks its TensorRT version and GPU (onnx2trt.check_repository)


def record(job, path: Path) -> dict:
    plan = path.parent / "model.plan.json"  # the TensorRT version + GPU the engine needs
    return {"tensorrt": json.loads(plan.read_text())} if plan.is_file() else {}


TENSORRT = register(Format(
    name="tensorrt", artifact="model.plan", export=export, runner=runner, check=check, preflight=preflight,
    record=record, in_process=False,
    refused={"int4": "trtexec makes int4 engines only from ONNX graphs with int4 quantize nodes, which this builder "
                     "does not write; use format onnx with int4, or tensorrt with fp16 or int8"},
    native=dict(platform="tensorrt_plan", backend="tensorrt", default_model_filename="model.plan"),
))
