"""torch -> a self-contained ExportedProgram (`model.pt2`): loads with torch alone, no transformers.

Served by the python backend (`runner: torch`); fp16/bf16 variants cast the weights before export.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from builder.errors import RunError, root_reason

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def export(part, example: tuple, dst: Path, precision: str) -> None:
    import copy

    import torch
    from torch.export import Dim

    dtype = getattr(torch, DTYPES[precision])
    module = copy.deepcopy(part.module)
    inner = getattr(module, "inner", None)
    if getattr(inner, "_supports_sdpa", False) and hasattr(inner, "set_attn_implementation"):
        # fused attention kernels; the ONNX export keeps eager. CNNs (ConvNeXt, ResNet) have no attention.
        inner.set_attn_implementation("sdpa")
    module = module.to(dtype)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in example)
    dims: dict[str, Dim] = {}

    def dim(name: str, low: int, high: int | None = None):
        if name not in dims:
            dims[name] = Dim(name, min=low, max=high) if high else Dim(name, min=low)
        return dims[name]

    from builder.convert.torch2onnx import axis_names

    limits = {"batch": (1, 4096)}
    for t in part.inputs:
        for axis, name in axis_names(part)[part.inputs.index(t)].items():
            if name != "batch" and t.max_dims:
                limits.setdefault(name, (2 if name == "sequence" else 1, t.max_dims[axis - (0 if part.batch_in_dims else 1)]))
    shapes = tuple({axis: dim(name, *limits.get(name, (1, None))) for axis, name in axes.items()}
                   for axes in axis_names(part))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module, args, dynamic_shapes=(shapes,), strict=False)  # forward(*args)
        except Exception as exc:
            raise RunError(f"torch.export failed: {root_reason(exc)}") from exc
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(dst))
