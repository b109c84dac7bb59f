"""`triton-builder.json`: what a repository holds, how each model was made, and its numbers.

Layout (JSON):
{
  "schema": 1, "builder_version": "...", "runtime": "python" | "native",
  "spec": "path/of/spec.yaml", "tool_versions": {"torch": "...", ...},
  "models": {
    "<triton model name>": {
      "role": "variant" | "ensemble" | "preprocess" | "postprocess",
      "model": "<spec model name>", "task": "...", "format": "onnx", "precision": "fp16",
      "status": "passed" | "failed",
      "signature": {Signature.to_dict()},
      "files": [{"path": "1/model.onnx", "bytes": 123, "sha256": "..."}],
      "verification": {"passed": true, "tolerance": {...}, "outputs": {"<name>": {...}}},
      "reference": "reference.npz" | null,   # inputs "input:<name>", outputs "output:<name>"
      "command": "the command that reproduces the artifact",
      "steps": ["model_pre", "model_onnx_fp32", ...]   # ensembles only
    }
  }
}
The reference file lives in the model's directory (Triton ignores non-numeric entries there).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from builder.errors import UserError
from builder.signature import Signature

MANIFEST = "triton-builder.json"
SCHEMA = 1


def read_manifest(repo: Path) -> dict:
    path = Path(repo) / MANIFEST
    if not path.is_file():
        raise UserError(f"{repo}: no {MANIFEST} here; build a repository with 'triton-builder build SPEC -o {repo}'")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); rebuild the repository") from exc
    if data.get("schema") != SCHEMA:
        raise UserError(f"{path}: schema {data.get('schema')!r} is not {SCHEMA}; rebuild with this triton-builder")
    return data


def write_manifest(repo: Path, data: dict) -> None:
    path = Path(repo) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def signature_of(entry: dict) -> Signature:
    return Signature.from_dict(entry["signature"])


def save_reference(path: Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    arrays = {f"input:{k}": v for k, v in inputs.items()}
    arrays.update({f"output:{k}": v for k, v in outputs.items()})
    np.savez(path, **arrays)


def load_reference(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        inputs = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
        outputs = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("output:")}
    return inputs, outputs
