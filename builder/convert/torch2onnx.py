"""torch -> ONNX with torch.onnx's dynamo exporter: dynamic batch and sequence axes, names from the part."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from builder.errors import RunError, root_reason

EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data (protobuf's 2 GiB limit)


def dynamic_shapes(part, batch: bool) -> tuple[dict, ...]:
    shapes = []
    for t in part.inputs:
        axes = {0: "batch"} if batch else {}
        for i, d in enumerate(t.dims):
            if d == -1:
                axes[i + 1] = "sequence" if t.kind in ("token_ids", "attention_mask", "token_type_ids") else f"{t.name}_{i}"
        shapes.append(axes)
    return tuple(shapes)


def export(part, example: tuple, dst: Path, batch: bool = True) -> None:
    import torch

    dst.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                part.module, example, dynamo=True, verbose=False,
                input_names=[t.name for t in part.inputs], output_names=list(part.outputs),
                dynamic_shapes=(dynamic_shapes(part, batch),), optimize=True,  # forward(*args)
            )
        except Exception as exc:  # the exporter raises many types; keep the first line of its reason
            raise RunError(f"torch.onnx export failed: {root_reason(exc)}") from exc
    size = sum(p.numel() * p.element_size() for p in part.module.parameters())
    program.save(str(dst), external_data=size > EXTERNAL_DATA_BYTES)
