"""The YAML spec: strict, typed, with one-line errors that name the file, the field and the fix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from builder import families, formats
from builder.errors import UserError

TASKS = families.tasks()  # one per registered family (builder/families)
IMAGE_TASKS = ("image-classification", "zero-shot-image-classification")
FORMATS = formats.names()  # every registered format (builder/formats)
LLM_FORMATS = formats.only_for("generation")  # the LLM backends' formats: the generation endpoint only
VARIANT_OPTIONS = {"cuda_graphs": False, "compile": "none", "flow": "llmapi"}  # format-specific fields, defaults
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
RUNTIMES = ("python", "native")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tolerance(Strict):
    """A variant passes when every output meets every bound given here (worst sample counts)."""

    atol: float | None = Field(None, gt=0)
    min_cosine: float | None = Field(None, gt=0, le=1)


DEFAULT_TOLERANCE = {
    "fp32": Tolerance(atol=1e-3, min_cosine=0.9999),
    "fp16": Tolerance(atol=5e-2, min_cosine=0.999),
    "bf16": Tolerance(atol=2e-1, min_cosine=0.99),
    "int8": Tolerance(min_cosine=0.98),
    "int4": Tolerance(min_cosine=0.95),
}


class DynamicBatching(Strict):
    max_queue_delay_us: int = Field(100, ge=0)
    preferred_batch_sizes: list[int] = []

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be >= 1")
        return sorted(set(v))


class Instances(Strict):
    kind: Literal["cpu", "gpu"] = "cpu"
    count: int = Field(1, ge=1, le=64)  # with kind gpu: instances on each GPU
    # intra-op threads of each instance; 0 lets the runtime use every core. The default of 1 keeps
    # instances (and a load generator on the same machine) from spinning against each other.
    threads: int = Field(1, ge=0, le=256)
    # kind gpu: which GPUs get `count` instances each; "all" (Triton's default) is every visible GPU
    gpus: list[int] | Literal["all"] | None = None

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus_shape(cls, v: Any) -> Any:
        if v is None or v == "all" or (isinstance(v, list) and all(isinstance(g, int) and not isinstance(g, bool) for g in v)):
            return v
        raise ValueError(f"{v!r} is not a list of GPU indices; use e.g. [0, 1], or all")

    @model_validator(mode="after")
    def _gpus(self) -> "Instances":
        if self.gpus is not None and self.kind != "gpu":
            raise ValueError("gpus applies to kind: gpu only; set kind: gpu or remove gpus")
        if isinstance(self.gpus, list):
            if not self.gpus or any(g < 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus):
                raise ValueError(f"gpus {self.gpus} must be distinct device indices >= 0 (e.g. [0, 1]), or all")
        return self


class LevelPolicy(Strict):
    """The queue of one priority level (Triton's ModelQueuePolicy)."""

    max_queue_size: int = Field(0, ge=0)  # requests waiting at most; beyond it new ones are rejected; 0: unbounded
    timeout_us: int = Field(0, ge=0)  # a request waiting longer is rejected (timeout_action); 0: never
    timeout_action: Literal["reject", "delay"] = "reject"
    allow_timeout_override: bool = False  # a request may ask for a shorter timeout of its own


class QueuePolicy(LevelPolicy):
    """Admission control: bounded queues and timeouts, so overload gets fast errors instead of latency."""

    priority_levels: int = Field(0, ge=0, le=16)  # 0: one queue; N: requests carry a priority 1..N (1 first)
    default_priority: int | None = Field(None, ge=1)  # the level of a request that names none; default N
    levels: dict[int, LevelPolicy] = {}  # per-level queues; levels not listed use the fields above

    @model_validator(mode="after")
    def _levels(self) -> "QueuePolicy":
        if (self.default_priority is not None or self.levels) and not self.priority_levels:
            raise ValueError("default_priority and levels need priority_levels >= 1")
        if self.default_priority is not None and self.default_priority > self.priority_levels:
            raise ValueError(f"default_priority {self.default_priority} is above priority_levels {self.priority_levels}")
        bad = sorted(k for k in self.levels if not 1 <= k <= self.priority_levels)
        if bad:
            raise ValueError(f"levels {bad} are outside 1..{self.priority_levels} (priority_levels)")
        return self


class Serving(Strict):
    """Settings that can be given under `defaults:` and overridden per model."""

    max_batch_size: int | None = Field(None, ge=0)
    dynamic_batching: DynamicBatching | bool | None = None
    instances: Instances | None = None
    warmup: bool | None = None
    queue_policy: QueuePolicy | None = None  # admission control of the dynamic batcher's queue


SERVING_DEFAULTS = dict(max_batch_size=8, dynamic_batching=DynamicBatching(), instances=Instances(), warmup=True,
                        queue_policy=None)


class Source(Strict):
    """Exactly one of the fields."""

    path: str | None = None  # a local Hugging Face directory or a .gguf file (relative to the spec file)
    hf: str | None = None  # a hub id (needs internet)
    config: dict[str, Any] | None = None  # an inline transformers config: random init
    factory: str | None = None  # module:function returning (nn.Module, example inputs)
    package: str | None = None  # a directory or .gguf file inside an installed Python package: "pkg/sub/dir"
    revision: str | None = None  # with hf: a branch, tag or commit

    @model_validator(mode="after")
    def _exactly_one(self) -> "Source":
        given = [k for k in ("path", "hf", "config", "factory", "package") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, hf, config, factory, package (got {', '.join(given) or 'none'})")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config needs model_type (e.g. bert, clip, llama, vit)")
        if self.factory is not None and not re.fullmatch(r"[\w.]+:\w+", self.factory):
            raise ValueError("factory must look like 'package.module:function'")
        if self.revision is not None and self.hf is None:
            raise ValueError("revision goes with hf")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("path", "hf", "config", "factory", "package") if getattr(self, k) is not None)


class Shapes(Strict):
    max_sequence_length: int = Field(128, ge=2, le=32768)
    sequence_length: int = Field(16, ge=1)  # typical length: warmup, perf inputs, checks
    # cuda_graphs variants: lengths a request is padded up to (default: powers of two up to the max)
    sequence_buckets: list[int] | None = None
    image_size: int | None = Field(None, ge=8, le=4096)  # default: the model config's

    @model_validator(mode="after")
    def _typical_fits(self) -> "Shapes":
        if self.sequence_length > self.max_sequence_length:
            raise ValueError("sequence_length must be <= max_sequence_length")
        if self.sequence_buckets and max(self.sequence_buckets) > self.max_sequence_length:
            raise ValueError("sequence_buckets must not exceed max_sequence_length")
        return self

    def buckets(self) -> list[int]:
        if self.sequence_buckets:
            return sorted(set(self.sequence_buckets) | {self.max_sequence_length})
        out, n = [], 16
        while n < self.max_sequence_length:
            out.append(n)
            n *= 2
        return out + [self.max_sequence_length]


def _names(records: dict) -> str:
    """'a, b or c' of the records' names."""
    names = list(records)
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def _in_process(fmt: str) -> bool:
    """Whether a tensor format runs here (an ensemble's build-time check needs that)."""
    record = formats.REGISTRY["tensors"].get(fmt)
    return record is not None and record.in_process


def _any_endpoint(name: str) -> tuple[str, str]:
    """(name, the first endpoint with a record of it)."""
    return name, next(e for e in formats.ENDPOINTS if name in formats.REGISTRY[e])


class Variant(Strict):
    format: Literal[FORMATS]  # type: ignore[valid-type]
    precision: Literal[PRECISIONS] = "fp32"  # type: ignore[valid-type]
    calibration: Literal["dynamic", "static"] = "dynamic"  # int8 only
    tolerance: Tolerance | None = None
    # torch on GPU: replay captured CUDA graphs per (batch, sequence) bucket, inputs padded to the bucket
    cuda_graphs: bool = False
    compile: Literal["none", "inductor"] = "none"  # torch: torch.compile the program when the model loads
    # tensorrt-llm: llmapi (LLM() from model.yaml, the current path) or engine (trtllm-build + the
    # inflight_batcher_llm model set, for TensorRT-LLM <= 1.2)
    flow: Literal["llmapi", "engine"] = "llmapi"

    @model_validator(mode="after")
    def _combination(self) -> "Variant":
        """What the format's records say it takes (builder/formats: options, refused)."""
        records = [f for e in formats.ENDPOINTS for f in [formats.REGISTRY[e].get(self.format)] if f is not None]
        takes = {o for f in records for o in f.options}
        extra = [k for k, default in VARIANT_OPTIONS.items() if getattr(self, k) != default and k not in takes]
        if extra:
            owners = [n for n in FORMATS if all(k in formats.get(*_any_endpoint(n)).options for k in extra)]
            raise ValueError(f"{' and '.join(extra)} appl{'y' if len(extra) > 1 else 'ies'} to format "
                             f"{' or '.join(owners) or 'none'} only; remove {'them' if len(extra) > 1 else 'it'}")
        if self.format in LLM_FORMATS and self.calibration != "dynamic":
            raise ValueError(f"format {self.format} takes precision (and tolerance) only; remove calibration")
        if self.calibration == "static" and self.precision != "int8":
            raise ValueError("calibration: static applies to precision int8 only")
        if all(self.precision in f.refused for f in records):  # no endpoint makes it (one that does: Model checks)
            raise ValueError(f"{self.format} {self.precision} is not supported: {records[0].refused[self.precision]}")
        return self

    @property
    def tag(self) -> str:
        suffix = "_static" if self.calibration == "static" else ""
        suffix += "_inductor" if self.compile == "inductor" else ""
        suffix += "_graphs" if self.cuda_graphs else ""
        suffix += "_engine" if self.flow == "engine" else ""
        return f"{self.format}_{self.precision}{suffix}"

    @property
    def effective_tolerance(self) -> Tolerance:
        base = DEFAULT_TOLERANCE[self.precision]
        if self.tolerance is None:
            return base
        return base.model_copy(update=self.tolerance.model_dump(exclude_unset=True))


class Ensemble(Strict):
    """Pre-processing (tokenizer / image decoding) + the model + post-processing, as one Triton model."""

    variant: str | None = None  # the variant tag it points at, e.g. onnx_int8; default: the first that passed
    per_variant: bool = False  # also one ensemble per variant, named {name}_{variant}
    max_length: int | None = Field(None, ge=2)  # tokenizer truncation; default shapes.max_sequence_length
    top_k: int = Field(5, ge=1)  # classifiers: how many labels come back


class Generation(Strict):
    """Text generation served from a KV cache: the limits every runtime (ours, TensorRT-LLM, vLLM) is sized by."""

    max_sequences: int = Field(8, ge=1, le=4096)  # sequences decoded together (KV-cache slots); more wait in a queue
    max_prompt_tokens: int = Field(512, ge=1)  # longest prompt accepted, in tokens
    max_total_tokens: int = Field(1024, ge=2)  # prompt + generated tokens of one sequence (the cache length)
    max_tokens: int = Field(128, ge=1)  # new tokens when a request gives no max_tokens
    prefill_chunk: int = Field(128, ge=1)  # prompt tokens run per step, so a long prompt does not stall the others
    # our endpoint: tokens per streamed response after the first (each response costs the server a round trip);
    # 0 picks it per step: 1 up to 8 running sequences, then about 8 responses per step in all
    stream_interval: int = Field(0, ge=0)
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1)  # share of free GPU memory for the cache (ours: cache_tokens 0)
    # our endpoint's KV cache: paged (blocks of block_size tokens in one pool, prefixes shared between requests) or
    # slots (max_total_tokens reserved per sequence); cache_tokens: the paged pool, all sequences together; 0: on a
    # GPU gpu_memory_fraction of the memory free after the weights, on a CPU max_sequences x max_total_tokens
    kv_cache: Literal["paged", "slots"] = "paged"
    block_size: int = Field(16, ge=1, le=1024)
    prefix_caching: bool = True
    cache_tokens: int = Field(0, ge=0)
    tensor_parallel: int = Field(1, ge=1)  # TensorRT-LLM / vLLM: GPUs one model is split over
    pipeline_parallel: int = Field(1, ge=1)  # TensorRT-LLM: pipeline stages

    @model_validator(mode="after")
    def _limits(self) -> "Generation":
        if self.max_prompt_tokens >= self.max_total_tokens:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must be below max_total_tokens "
                             f"({self.max_total_tokens}) to leave room for generated tokens")
        if self.max_tokens > self.max_total_tokens - 1:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be below max_total_tokens ({self.max_total_tokens})")
        if 0 < self.cache_tokens < self.max_total_tokens:
            raise ValueError(f"cache_tokens ({self.cache_tokens}) cannot hold one sequence of max_total_tokens "
                             f"({self.max_total_tokens}); raise it, or 0 sizes it from the memory")
        return self


class Model(Serving):
    name: str
    task: Literal[TASKS]  # type: ignore[valid-type]
    source: Source
    variants: list[Variant] = Field(min_length=1)
    shapes: Shapes = Shapes()
    labels: list[str] | None = None  # class names; default: the model config's id2label
    outputs: list[str] | None = None  # serve only these of the task's outputs (e.g. [sentence_embedding])
    ensemble: Ensemble | bool | None = None  # true: the model's fp32 variant (or its only one)
    # text-generation: text in / text out from a KV cache, with these limits (absent: the defaults); false:
    # the logits-only forward instead (a tensor model, exportable to onnx)
    generation: Generation | bool | None = None
    # image models: uint8 pixels [3, H, W] (0-255, resized and cropped) in, the image processor's rescale
    # and normalization moved into the exported model: 4x fewer bytes per request than float32
    image_input: Literal["float32", "uint8"] = "float32"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v) or len(v) > 64:
            raise ValueError("use letters, digits, '_' and '-' only (at most 64, starting with a letter or digit)")
        return v

    @model_validator(mode="after")
    def _unique_variants(self) -> "Model":
        tags = [v.tag for v in self.variants]
        dup = sorted({t for t in tags if tags.count(t) > 1})
        if dup:
            raise ValueError(f"variant {dup[0]} is listed twice")
        if isinstance(self.ensemble, bool):  # the shorthand: the fp32 variant, or the only one
            chosen = next((v.tag for v in self.variants if v.precision == "fp32" and _in_process(v.format)),
                          tags[0] if len(tags) == 1 else None)
            if self.ensemble and chosen is None:
                raise ValueError(f"ensemble: true picks the fp32 variant (or the only one) and this model has neither; "
                                 f"write ensemble: {{variant: {tags[0]}}} with the variant you want")
            object.__setattr__(self, "ensemble", Ensemble(variant=chosen) if self.ensemble else None)
        if self.ensemble and self.ensemble.variant and self.ensemble.variant not in tags:
            raise ValueError(f"ensemble.variant {self.ensemble.variant!r} is not one of this model's variants "
                             f"({', '.join(tags)})")
        if self.ensemble and self.task == "text-generation":
            raise ValueError("ensemble does not apply to text-generation; a generation: block serves text in / "
                             "text out (tokenizer included) as one model")
        if self.generation not in (None, False) and self.task != "text-generation":
            raise ValueError(f"generation applies to task text-generation only (this model's task is {self.task})")
        if self.task == "text-generation":  # the generation endpoint unless the logits-only forward is asked for
            object.__setattr__(self, "generation", None if self.generation is False else
                               Generation() if self.generation in (None, True) else self.generation)
        else:
            object.__setattr__(self, "generation", None)
        if self.image_input != "float32" and self.task not in IMAGE_TASKS:
            raise ValueError(f"image_input applies to image models ({', '.join(IMAGE_TASKS)}); this model's task is "
                             f"{self.task}: remove image_input")
        endpoint = "generation" if self.generation is not None else "tensors"
        served = formats.REGISTRY[endpoint]  # the format records of what this model is served as
        for v in self.variants:
            record = served.get(v.format)
            if record is None and self.task != "text-generation":
                raise ValueError(f"variant {v.tag}: format {v.format} serves text-generation models only; "
                                 f"use {_names(served)} for this task")
            if record is None and endpoint == "tensors":
                raise ValueError(f"variant {v.tag}: format {v.format} serves the generation endpoint; remove "
                                 f"generation: false, or use {_names(served)} for the logits-only forward")
            if record is None:
                raise ValueError(f"variant {v.tag}: the generation endpoint is served as format {_names(served)}; "
                                 "remove the variant, or write generation: false for the logits-only forward")
            if v.precision in record.refused:
                raise ValueError(f"variant {v.tag}: {v.format} {v.precision} is not supported here: "
                                 f"{record.refused[v.precision]}")
        return self


class Spec(Strict):
    runtime: Literal[RUNTIMES] = "python"  # type: ignore[valid-type]
    defaults: Serving = Serving()
    models: list[Model] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "Spec":
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model name {dup[0]!r} is used twice; names must be unique")
        return self

    def serving(self, model: Model) -> dict:
        """The effective serving settings of a model: model override > defaults > built-in."""
        out = dict(SERVING_DEFAULTS)
        for layer in (self.defaults, model):
            for key in SERVING_DEFAULTS:
                value = getattr(layer, key)
                if value is not None:
                    out[key] = value
        if out["dynamic_batching"] is True:
            out["dynamic_batching"] = DynamicBatching()
        mbs, db = out["max_batch_size"], out["dynamic_batching"]
        if db and mbs == 0 and model.dynamic_batching is None:
            out["dynamic_batching"] = db = False  # batching inherited from defaults does not apply here
        if db and mbs == 0:
            raise UserError(f"models[{model.name}]: dynamic_batching needs max_batch_size > 0; "
                            "set max_batch_size or dynamic_batching: false")
        if out["queue_policy"] is not None and not db:
            if model.queue_policy is not None:
                raise UserError(f"models[{model.name}].queue_policy: the queue belongs to the dynamic batcher; "
                                "set max_batch_size > 0 and dynamic_batching, or remove queue_policy")
            out["queue_policy"] = None  # inherited from defaults: no queue to bound here
        if db and any(b > mbs for b in db.preferred_batch_sizes):
            raise UserError(f"models[{model.name}].dynamic_batching.preferred_batch_sizes: "
                            f"{db.preferred_batch_sizes} has sizes above max_batch_size {mbs}; lower them or raise max_batch_size")
        return out


def _loc(loc: tuple, data: Any) -> str:
    """A field path like models[0].variants[2].precision, naming models by their name when known."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            name = node[item].get("name") if isinstance(node, list) and item < len(node) and isinstance(node[item], dict) else None
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]" + (f"({name})" if name and parts and parts[-1] == "models" else "")]
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(p for p in parts if p)


# What to write instead, for pydantic's type errors (its own words name the problem, not the fix).
WRITE_INSTEAD = {
    "int": "write a whole number, e.g. 8",
    "float": "write a number, e.g. 0.5",
    "bool": "write true or false",
    "string": "write a string, e.g. name: my-model",
    "list": "write a list, e.g. [a, b]",
    "dict": "write a mapping, e.g. {key: value}",
}
SHORTHANDS = {"Ensemble": "true or ", "DynamicBatching": "false, true or ", "Generation": "false or "}


def _fields_of(class_name: str) -> str:
    cls = globals().get(class_name)
    fields = ", ".join(getattr(cls, "model_fields", {})) if cls else ""
    return f"a mapping of its fields ({fields})" if fields else "a mapping"


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    got = err.get("input")
    shown = f"; got {got!r}" if isinstance(got, (str, int, float, bool, type(None))) else ""
    if kind == "extra_forbidden":
        return "unknown field; remove it or check its spelling"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{err['input']!r} is not allowed; use one of {expected}"
    if kind == "missing":
        return "is required"
    if kind in ("model_type", "model_attributes_type"):
        name = err.get("ctx", {}).get("class_name", "")
        return f"{msg.split(' or instance')[0]}{shown}; write {SHORTHANDS.get(name, '')}{_fields_of(name)}"
    base = kind.split("_")[0]
    if kind.endswith(("_type", "_parsing")) and base in WRITE_INSTEAD:
        return f"{msg}{shown}; {WRITE_INSTEAD[base]}"
    bounds = {"greater_than": "more than {gt}", "greater_than_equal": "{ge} or more", "less_than": "less than {lt}",
              "less_than_equal": "{le} or less"}
    if kind in bounds:
        return f"{msg}{shown}; write {bounds[kind].format(**err.get('ctx', {}))}"
    return msg.removeprefix("Value error, ")


def _clean_loc(err: dict) -> tuple:
    # pydantic adds the union member or validator name for unions (e.g. 'DynamicBatching', 'bool'); drop them
    return tuple(p for p in err["loc"] if not (isinstance(p, str) and (p[:1].isupper() or p == "bool"
                                                                      or p.startswith("function-after"))))


def load_spec(path: Path | str) -> Spec:
    """Load and validate a spec file; every problem is a UserError with one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: spec file not found; give the path of a YAML spec (see examples/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the spec must be a mapping with a 'models' list (see examples/demo.yaml)")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        # a misspelt key explains a "missing" one: report it first
        errors = sorted(exc.errors(), key=lambda e: e["type"] == "missing")
        # a mapping given for a `Model | bool` field: the bool branch's complaint is noise beside the mapping's
        errors = [e for e in errors if not (e["loc"][-1:] == ("bool",) and len(errors) > 1)] or errors
        err = errors[0]
        where = _loc(_clean_loc(err), data) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"{path}: {where}: {_message(err)}{more}") from None
    for model in spec.models:
        try:
            spec.serving(model)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
        if model.source.path is not None:
            local = (path.parent / model.source.path).resolve()
            if not (local.is_dir() or (local.is_file() and local.suffix == ".gguf")):
                raise UserError(f"{path}: models[{model.name}].source.path: {local} is not a directory or a .gguf "
                                "file; give a local Hugging Face model directory or a GGUF file (relative to the spec file)")
    return spec
