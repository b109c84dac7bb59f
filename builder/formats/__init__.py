"""Formats as records: each format is one module here with one `register` line (docs/EXTENDING.md).

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
- `endpoint`: what the served model is: "tensors" (a stateless tensor model) or "generation" (text in /
  text out from a KV cache). A name may have a record for each (`torch` has both).
- `verify(job, path)`: a verification of its own (the generation endpoint's, against HF generate);
  None: `runner` against the fp32 references, output by output.
- `reference(job, path, verification)`: writes the reference file beside the model (reference.npz).
- `build(job)`: a format that writes its own model set (an LLM backend's) makes the whole variant and
  returns its manifest entries; None: export, verify, render, record as above.
- `options`: the variant fields it takes beyond format, precision and tolerance (torch: cuda_graphs,
  compile); `refused`: precision -> why it cannot make that precision. The spec reads both.
- `request(fields, flow)`: a generation request given in our endpoint's names (`base.FIELDS`) as the served
  model takes it, in its own tensor names (a `GenerationRequest`: tensors, types, how its responses read), or
  `Unhonoured` naming a field it has no input for; `honours(flow)`: the fields it can send. perf's LLM load
  and the OpenAI front both send what it makes.

A variant flows through the build as one `Job` record (builder.build): caching, export,
verification, config and manifest all read it.
"""

from __future__ import annotations

from builder.errors import UserError
from builder.formats.base import ENDPOINTS, FORMATS, REGISTRY, Format, register  # noqa: F401  (record, registry)


def get(name: str, endpoint: str = "tensors") -> Format:
    """The record of format `name` for `endpoint` ("tensors": the stateless tensor model of the encoder
    path; "generation": text in / text out)."""
    _load()
    known = REGISTRY[endpoint]
    if name not in known:
        raise UserError(f"format {name!r} is not known for the {endpoint} endpoint; known: {', '.join(sorted(known))}")
    return known[name]


def names() -> tuple[str, ...]:
    """Every format name, tensor formats first, in registration order."""
    _load()
    return tuple(dict.fromkeys(n for endpoint in ENDPOINTS for n in REGISTRY[endpoint]))


def only_for(endpoint: str) -> tuple[str, ...]:
    """The formats that exist for `endpoint` alone (the LLM backends: generation only)."""
    _load()
    others = {n for e in ENDPOINTS if e != endpoint for n in REGISTRY[e]}
    return tuple(n for n in REGISTRY[endpoint] if n not in others)


def _all() -> list[Format]:
    _load()
    return [f for endpoint in ENDPOINTS for f in REGISTRY[endpoint].values()]


def for_backend(backend: str, platform: str = "") -> Format | None:
    """The format a native config's backend (or platform) serves; None for the python backend."""
    return next((f for f in _all() if f.native and backend and f.native["backend"] == backend), None) or \
        next((f for f in _all() if f.native and platform and f.native["platform"] == platform), None)


def for_artifact(filename: str) -> Format | None:
    """The format whose artifact file this is (a python-backend config names it in `parameters.artifact`)."""
    return next((f for f in _all() if f.artifact == filename), None)


def _load() -> None:
    """Import every module of this package once: each registers its formats (a new format is a new module)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
