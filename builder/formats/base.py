"""The format record and its registry (see builder.formats for what each field means)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

ENDPOINTS = ("tensors", "generation")  # a stateless tensor model | text in / text out from a KV cache


def _none(*_args, **_kwargs):
    return None


def _save_reference(job, path, check) -> str:
    from builder.manifest import save_reference

    save_reference(job.model_dir / "reference.npz", job.samples[0], job.references[0])
    return "reference.npz"


@dataclass(frozen=True)
class Format:
    name: str
    artifact: str  # the artifact's file name under the version directory
    export: Callable  # (job) -> (path, reproduce command)
    runner: Callable | None = None  # (path, sig, precision, device) -> feeds -> {output: array}; None: not here
    python_runner: str | None = None
    native: dict | None = None
    parameters: Callable = lambda job, path: {}
    check: Callable = lambda path, cfg, name: []
    preflight: Callable = _none
    render: Callable = _none
    record: Callable = lambda job, path: {}
    in_process: bool = True
    endpoint: str = "tensors"  # what the served model is (ENDPOINTS)
    verify: Callable | None = None  # (job, path) -> verification record; None: `runner` against the references
    reference: Callable = _save_reference  # (job, path, verification) -> the reference file written in model_dir
    build: Callable | None = None  # (job) -> {triton name: manifest entry}: a format that writes its own model set
    options: tuple[str, ...] = ()  # the variant fields beyond format/precision/tolerance it takes
    refused: dict = field(default_factory=dict)  # precision -> why this format cannot make it
    # the generation endpoint: (text, output_tokens, sampling, flow) -> one streaming request in the served
    # model's own tensor names, the output length forced where its backend can (perf's load)
    request: Callable | None = None

    def backend(self, runtime: str) -> dict:
        """Which Triton backend serves this format under `runtime`, and the settings it needs."""
        if self.native is not None and (runtime == "native" or self.python_runner is None):
            return dict(self.native)
        return dict(platform="", backend="python", default_model_filename="")


REGISTRY: dict[str, dict[str, Format]] = {endpoint: {} for endpoint in ENDPOINTS}
FORMATS = REGISTRY["tensors"]


def register(fmt: Format) -> Format:
    if fmt.endpoint not in REGISTRY:
        raise ValueError(f"format {fmt.name!r}: endpoint {fmt.endpoint!r} is not one of {', '.join(ENDPOINTS)}")
    if fmt.name in REGISTRY[fmt.endpoint]:
        raise ValueError(f"format {fmt.name!r} is registered twice for the {fmt.endpoint} endpoint")
    REGISTRY[fmt.endpoint][fmt.name] = fmt
    return fmt
