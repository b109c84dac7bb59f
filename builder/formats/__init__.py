"""Formats as records: each format is one module here and one `register` line.

A `Format` says everything the rest of the builder needs to know about it, so build, render,
validate and the ensembles read the record instead of branching on format names:

- `export(job)`: the conversion. Writes the artifact under `job.version_dir`; returns its path and the
  command that reproduces it.
- `runner(path, sig, precision, device)`: a function feeds -> outputs that runs the artifact in-process
  (verification, ensemble checks); None for a render-only target (nothing to run here: verification is skipped and
  the variant is recorded as not verified).
- `python_runner`: the `runner` parameter of templates/python/runner.py that serves the artifact in
  the python backend (None: this format has no python-backend serving).
- `native`: the Triton platform / backend / default_model_filename with `runtime: native` (None:
  served by the python backend, or by its own config, whatever the runtime).
- `parameters(job, path)`: extra config parameters for the python-backend runner.
- `check(path, cfg, name)`: problems of an artifact against its parsed config (`validate`).
- `preflight(where, runtime)`: refuse before any work (a UserError with one line) where the format
  cannot be built.
- `render(job, path)`: a format with its own config and files (an LLM target: a model set, its own
  config.pbtxt) writes them and returns True; None: the standard config.pbtxt is rendered.
- `record(job, path)`: extra manifest fields for the variant (TensorRT: the version and GPU it needs).
- `in_process`: whether an ensemble's build-time check can run it here (TensorRT: no).

A variant flows through the build as one `Job` record (builder.build): caching, export,
verification, config and manifest all read it.
"""

from __future__ import annotations

from builder.errors import UserError
from builder.formats.base import FORMATS, Format, register  # noqa: F401  (the record and its registry)


def get(name: str) -> Format:
    _load()
    if name not in FORMATS:
        raise UserError(f"format {name!r} is not known; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def for_backend(backend: str, platform: str = "") -> Format | None:
    """The format a native config's backend (or platform) serves; None for the python backend."""
    _load()
    return next((f for f in FORMATS.values() if f.native and backend and f.native["backend"] == backend), None) or \
        next((f for f in FORMATS.values() if f.native and platform and f.native["platform"] == platform), None)


def for_artifact(filename: str) -> Format | None:
    """The format whose artifact file this is (a python-backend config names it in `parameters.artifact`)."""
    _load()
    return next((f for f in FORMATS.values() if f.artifact == filename), None)


def _load() -> None:
    from builder.formats import llm, onnx, tensorrt, torch  # noqa: F401  (registration)
