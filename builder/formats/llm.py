"""Formats `tensorrt-llm` and `vllm`: render-only repositories for Triton's LLM backends.

They are built by the generation build (builder.generation via builder.targets), not by the per-variant
export below: a text-generation model with a `generation:` block goes there as a whole (the spec refuses
these formats anywhere else). Nothing of them runs here: no runner, not in-process.
"""

from __future__ import annotations

from pathlib import Path

from builder.errors import UserError
from builder.formats.base import Format, register


def _export(fmt: str):
    def export(job) -> tuple[Path, str]:
        raise UserError(f"models[{job.model.name}].variants[{job.variant.tag}]: format {fmt} is built from a "
                        "generation: block (task: text-generation); add one")
    return export


def _render(job, path) -> bool:
    return True  # builder.targets wrote the model set and its config


register(Format("tensorrt-llm", "model.yaml", _export("tensorrt-llm"), render=_render, in_process=False))
register(Format("vllm", "model.json", _export("vllm"), render=_render, in_process=False))
