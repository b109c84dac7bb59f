"""`format: vllm`: a model directory for Triton's vLLM backend (triton-inference-server/vllm_backend).

    <name>/config.pbtxt    backend "vllm", one KIND_MODEL instance; nothing else. The backend's
                           auto_complete_config declares the tensors (text_input, stream,
                           sampling_parameters, exclude_input_in_output, return_* -> text_output,
                           finish_reason, num_input_tokens, num_output_tokens, ...) and forces
                           decoupled: true and max_batch_size: 0, so neither is written here and a
                           config that contradicts them is refused.
    <name>/1/model.json    vLLM AsyncEngineArgs keywords, from the spec's generation: block.

Render only: no vLLM here. The serving image is Triton's `-vllm-python-py3` NGC image.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.deploy import ngc
from builder.errors import UserError
from builder.targets.common import (DTYPES, MODEL_REPOSITORY, files_under, lint_streaming, lint_world_size,
                                    read_config, resolve, write_config)

# the serving image; its vLLM version per tag is in builder.deploy.ngc
IMAGE = ngc.VLLM_IMAGE
# in-flight quantization vLLM does itself; int8 weight-only has no in-flight method there
QUANTIZATION = {"int4": "bitsandbytes"}


def engine_args(*, model: str, tokenizer: str | None, precision: str, generation, enforce_eager: bool = False) -> dict:
    """AsyncEngineArgs keywords (vllm/engine/arg_utils.py) for the spec's limits."""
    if precision == "int8":
        raise UserError("format vllm, precision int8: vLLM has no in-flight int8 weight-only quantization; use int4 "
                        "(bitsandbytes), or a pre-quantized checkpoint (GPTQ/AWQ, read from its config.json) with "
                        "precision bf16")
    if model.endswith(".gguf") and tokenizer is None:
        raise UserError("format vllm: a GGUF model needs the original model's tokenizer directory; give tokenizer")
    g = generation
    args = {"model": model}
    if tokenizer is not None:
        args["tokenizer"] = tokenizer
    args |= {
        "dtype": DTYPES.get(precision, "bfloat16"),
        "max_model_len": g.max_total_tokens,
        "max_num_seqs": g.max_sequences,
        "max_num_batched_tokens": max(g.prefill_chunk, g.max_sequences),
        "enable_chunked_prefill": True,
        "gpu_memory_utilization": g.gpu_memory_fraction,
        "tensor_parallel_size": g.tensor_parallel,
        "pipeline_parallel_size": g.pipeline_parallel,
        "enforce_eager": enforce_eager,
    }
    if precision in QUANTIZATION:
        args["quantization"] = QUANTIZATION[precision]
    return args


def serve_command(repo: Path, image: str = IMAGE) -> str:
    return (f"docker run --rm --gpus all --shm-size=1g --ulimit memlock=-1 --ulimit stack=67108864 "
            f"-p 8000:8000 -p 8001:8001 -p 8002:8002 -v {Path(repo).resolve()}:{MODEL_REPOSITORY} {image} "
            f"tritonserver --model-repository={MODEL_REPOSITORY}")


def render(repo: Path, *, name: str, weights: str, tokenizer: str | None, precision: str, generation, serving: dict,
           image: str = IMAGE, model_repository: str = MODEL_REPOSITORY, enforce_eager: bool = False) -> dict:
    """Write repo/<name>/{config.pbtxt,1/model.json}; return {name: manifest entry}."""
    repo = Path(repo)
    where = f"{name} (format vllm)"
    model = resolve(repo, weights, where=where, model_repository=model_repository)
    tok = resolve(repo, tokenizer, where=where, model_repository=model_repository) if tokenizer else None
    args = engine_args(model=model, tokenizer=tok, precision=precision, generation=generation,
                       enforce_eager=enforce_eager)
    model_dir = repo / name
    write_config(model_dir / "config.pbtxt", "llm/model.pbtxt.j2", name=name, backend="vllm", max_batch_size=None,
                 decoupled=None, dynamic_batching=None, inputs=[], outputs=[], instance_kind="KIND_MODEL",
                 instance_count=1, parameters={})
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.json").write_text(json.dumps(args, indent=2) + "\n")
    return {name: {
        "role": "llm", "target": "vllm", "precision": precision,
        "files": files_under(repo, name),
        "settings": {"engine_args": args, "generation": generation.model_dump(), "image": image},
        "commands": {"serve": serve_command(repo, image)},
    }}


def check(model_dir: Path, entry: dict | None = None, *, gpus: int | None = None) -> None:
    """Re-read a vLLM model directory; UserError (one line) on anything the backend or the spec would refuse."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir / "config.pbtxt")
    where = f"{model_dir.name}/config.pbtxt"
    if cfg.backend != "vllm":
        raise UserError(f"{where}: backend is {cfg.backend!r}, not 'vllm'; rebuild the repository")
    if cfg.HasField("model_transaction_policy"):
        lint_streaming(where, cfg.model_transaction_policy.decoupled)
    if cfg.max_batch_size > 0:
        raise UserError(f"{where}: max_batch_size is {cfg.max_batch_size}; the vLLM backend batches itself and "
                        "forces 0: remove max_batch_size")
    path = model_dir / "1" / "model.json"
    if not path.is_file():
        raise UserError(f"{model_dir.name}/1/model.json: missing; the vLLM backend needs its engine arguments there")
    try:
        args = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{model_dir.name}/1/model.json: not valid JSON ({exc.msg} at line {exc.lineno}); "
                        "rebuild the repository") from None
    if not isinstance(args, dict) or not args.get("model"):
        raise UserError(f"{model_dir.name}/1/model.json: needs an object with 'model' (a hub id or a path)")
    tp, pp = int(args.get("tensor_parallel_size", 1)), int(args.get("pipeline_parallel_size", 1))
    kinds = {g.kind for g in cfg.instance_group}
    from tritonclient.grpc import model_config_pb2

    if tp * pp > 1 and model_config_pb2.ModelInstanceGroup.KIND_GPU in kinds:
        raise UserError(f"{where}: KIND_GPU is for single-GPU models and this one spans {tp * pp} GPUs; use KIND_MODEL")
    lint_world_size(f"{model_dir.name}/1/model.json", tp, pp, gpus=gpus)
    if entry is not None:
        built = entry["settings"]["engine_args"]
        changed = sorted(k for k in set(built) | set(args) if built.get(k) != args.get(k))
        if changed:
            raise UserError(f"{model_dir.name}/1/model.json: {', '.join(changed)} differ from the build recorded in "
                            "triton-builder.json; rebuild the repository or change the spec")
