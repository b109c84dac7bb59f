"""The format record and its registry (see builder.formats for what each field means)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from builder.errors import UserError

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
    # the generation endpoint: (fields, flow) -> GenerationRequest, a request given in our endpoint's names
    # (FIELDS) in the served model's own tensors; perf's load and the OpenAI front both send what it makes
    request: Callable | None = None
    honours: Callable[[str], frozenset] = lambda flow: frozenset()  # flow -> the FIELDS `request` can send

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


# A generation request in our endpoint's names: each format's `request` maps them to its model's own tensors and
# refuses (Unhonoured) any it has no way to send. text_input, stop (a list of strings), logprobs (top-k count),
# guide ({"json_schema": ...} | {"json_object": True}) and prompt_ids (token ids) are the non-scalar ones.
FIELDS = ("text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos",
          "min_tokens", "add_special_tokens", "logprobs", "guide", "prompt_ids", "presence_penalty",
          "frequency_penalty", "repetition_penalty")
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")


class Unhonoured(UserError):
    """A request field the served model's backend has no input for: the client's 400, naming it."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field, self.why = field, why


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the served model takes it, and how its responses read."""

    inputs: dict[str, list]  # tensor name -> values (perf_analyzer's input data; the gRPC tensors)
    types: dict[str, str]  # tensor name -> Triton datatype
    parameters: dict = field(default_factory=dict)  # gRPC request parameters (our endpoint's logprobs, guide, ...)
    batched: bool = False  # the model has max_batch_size > 0: each tensor gets a leading batch dimension of 1
    text: str = "delta"  # each response's text_output: the new text ("delta") or all of it so far ("total")
    counts: str | None = "total"  # num_output_tokens: a running "total", this response's ("delta"), None: not sent
    finish_reason: bool = True  # whether responses carry finish_reason
    logprobs: int | None = None  # top log-probabilities asked for, where the backend returns more (vLLM)


WHAT = {"prompt_ids": ("token ids", "give the prompt as text"), "guide": ("guided decoding", "leave it out"),
        **{p: ("penalties", "leave it out") for p in PENALTIES}, "min_tokens": ("a minimum length", "leave it out")}


def refuse_unhonoured(fields: dict, honoured: frozenset, backend: str) -> None:
    for name in FIELDS:
        if name in fields and name not in honoured:
            what, fix = WHAT.get(name, ("it", "leave it out"))
            raise Unhonoured(name, f"{backend} has no input for {what}; {fix}")
