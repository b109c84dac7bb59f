"""config.pbtxt from Jinja templates (StrictUndefined), parsed back with Triton's own schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf import text_format
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from builder.errors import RunError
from builder.signature import Signature, TensorSpec

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def pbstr(value: object) -> str:
    """A protobuf text-format string literal (quotes, backslashes and control characters escaped)."""
    text = str(value)
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 32:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined,
                      keep_trailing_newline=True, autoescape=False)
    env.filters["pbstr"] = pbstr
    return env


def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse with tritonclient's ModelConfig; raise RunError naming the line on failure."""
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise RunError(f"{where}: rendered config does not parse with Triton's schema: {exc}") from exc


def render_template(template: str, where: str, **values) -> str:
    text = environment().get_template(template).render(**values)
    parse_config(text, where)
    return text


PYTHON_BACKEND = dict(platform="", backend="python", default_model_filename="")  # pre/post-processing, runners


def input_limits(sig: Signature) -> str:
    """JSON for the runner's `input_limits` parameter: each input's maximum dims and, for token ids a
    family declared (those with a maximum length), the vocabulary size. A factory's ids carry a `high`
    read off one example, not a vocabulary: it is not enforced."""
    import json

    limits = {}
    for t in sig.inputs:
        entry = {}
        if t.max_dims:
            entry["max_dims"] = list(t.max_dims)
            if t.high is not None:
                entry["high"] = int(t.high)
        if entry:
            limits[t.name] = entry
    return json.dumps(limits, separators=(",", ":"), sort_keys=True)


def warmup_files(sig: Signature, batch: int, model_dir: Path, rng_seed: int = 0) -> list[dict]:
    """Write valid warmup inputs (ids below the vocab, masks of ones) as raw files under warmup/."""
    from builder.signature import make_inputs

    arrays = make_inputs(sig, batch, np.random.default_rng(rng_seed))
    folder = model_dir / "warmup"
    folder.mkdir(parents=True, exist_ok=True)
    inputs = []
    for t in sig.inputs:
        value = arrays[t.name]
        raw = _serialize(value, t)
        (folder / t.name).write_bytes(raw)
        dims = value.shape[1:] if sig.max_batch_size > 0 else value.shape
        inputs.append(dict(name=t.name, triton_dtype=t.triton_dtype, dims=list(dims), file=t.name))
    return [dict(name="valid_inputs", batch_size=batch if sig.max_batch_size > 0 else 1, inputs=inputs)]


def _serialize(value: np.ndarray, t: TensorSpec) -> bytes:
    if t.dtype == "bytes":
        out = bytearray()
        for item in value.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode()
            out += len(b).to_bytes(4, "little") + b
        return bytes(out)
    return np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()


def preferred_batch_sizes(sizes, max_batch_size: int) -> list[int]:
    """The `preferred_batch_size` list to render: only sizes the batcher can form (<= max_batch_size,
    whatever overrode either), and none when what is left adds nothing to Triton's own rule (send the
    largest batch it can form up to max_batch_size within the queue delay). Rendered by default it
    only hurts: a preferred size makes the batcher send smaller batches than it could, and any tool
    that lowers max_batch_size (Model Analyzer's search, `tune`) gets an illegal config."""
    kept = sorted({int(b) for b in sizes if 0 < int(b) <= max_batch_size})
    return [] if kept in ([], [max_batch_size]) else kept


def model_config(name: str, sig: Signature, *, backend: dict, serving: dict, parameters: dict,
                 warmup: list[dict]) -> str:
    """config.pbtxt of a tensor model; `backend`: platform, backend and default_model_filename (its format
    record's `backend(runtime)`, or PYTHON_BACKEND)."""
    db = serving["dynamic_batching"] if sig.max_batch_size > 0 else None
    instances = serving["instances"]
    gpu = instances.kind == "gpu"
    return render_template(
        "config.pbtxt.j2", f"{name}/config.pbtxt",
        name=name, max_batch_size=sig.max_batch_size, inputs=sig.inputs, outputs=sig.outputs,
        dynamic_batching=db or None,
        preferred=preferred_batch_sizes(db.preferred_batch_sizes, sig.max_batch_size) if db else [],
        queue_policy=serving.get("queue_policy") if db else None,
        instance_kind="KIND_GPU" if gpu else "KIND_CPU", instance_count=instances.count,
        instance_gpus=instances.gpus if gpu and isinstance(instances.gpus, list) else None,
        warmup=warmup, parameters=parameters, **backend,
    )
