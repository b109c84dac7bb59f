"""Render-only targets for Triton's LLM backends, one module per format:

    TARGETS[format].render(repo, *, name, weights, tokenizer, precision, generation, serving, **options)
        -> {triton model name: manifest entry}
    TARGETS[format].check(model_dir, entry=None, **options) -> None   (UserError, one line)

`weights` / `tokenizer`: a path relative to the repository root (copied there first) or a hub id.
"""

from __future__ import annotations

from builder.targets import trtllm, vllm

TARGETS = {"vllm": vllm, "tensorrt-llm": trtllm}
