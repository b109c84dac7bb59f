"""torch -> ONNX with torch.onnx's dynamo exporter: dynamic batch and sequence axes, names from the part."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from builder.errors import RunError, root_reason

EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data (protobuf's 2 GiB limit)


def axis_names(part) -> list[dict[int, str]]:
    """Per input, {axis: name} of its dynamic axes: batch, sequence (shared by token inputs), others."""
    from builder.families import TOKEN_KINDS

    shapes = []
    for t in part.inputs:
        dims = t.dims if part.batch_in_dims else (-1, *t.dims)
        axes = {}
        for axis, d in enumerate(dims):
            if axis == 0:
                axes[0] = "batch"
            elif d == -1:
                axes[axis] = "sequence" if t.kind in TOKEN_KINDS and axis == len(dims) - 1 else f"{t.name}_{axis}"
        shapes.append(axes)
    return shapes


def export(part, example: tuple, dst: Path) -> None:
    import torch

    dst.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                part.module, example, dynamo=True, verbose=False,
                input_names=[t.name for t in part.inputs], output_names=list(part.outputs),
                dynamic_shapes=(tuple(axis_names(part)),), optimize=True,  # forward(*args)
            )
        except Exception as exc:  # the exporter raises many types; keep the first line of its reason
            raise RunError(f"torch.onnx export failed: {root_reason(exc)}") from exc
    size = sum(p.numel() * p.element_size() for p in part.module.parameters())
    program.save(str(dst), external_data=size > EXTERNAL_DATA_BYTES)
