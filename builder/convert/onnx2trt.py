"""ONNX -> TensorRT engine (`model.plan`). Needs TensorRT: locally when `tensorrt` imports, else in the
matching NGC Triton container through Docker. Neither exists on this project's CPU machines."""

from __future__ import annotations

import importlib.util

from builder.errors import UserError


def check_available(where: str) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        return
    from builder.runtime.docker import docker_available

    if docker_available():
        return
    raise UserError(f"{where}: format tensorrt needs TensorRT (python package tensorrt) or a Docker engine to run "
                    "the NGC Triton container; neither is here; drop the variant or build on a GPU machine")


def build_engine(onnx_path, plan_path, variant, part):
    raise UserError("format tensorrt: engine building is not implemented yet")
