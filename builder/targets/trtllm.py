"""`format: tensorrt-llm`: repositories for Triton's TensorRT-LLM backend.

flow llmapi (default; TensorRT-LLM's `triton_backend/all_models/llmapi`, the current path):
    <name>/config.pbtxt      python backend; the tensors of TensorRT-LLM's llmapi model (text_input,
                             streaming, sampling_param_* -> text_output, finish_reason, ...). No
                             max_batch_size / decoupled here: that model's auto_complete_config takes
                             them from model.yaml's triton_config.
    <name>/1/model.yaml      arguments of TensorRT-LLM's LLM() from the spec, plus triton_config.
    <name>/1/model.py, helpers.py   TensorRT-LLM's own model files, copied from the serving image
                             (/app/all_models/llmapi/tensorrt_llm/1/) by the `setup` command.

flow engine (legacy, TensorRT-LLM <= 1.2: convert_checkpoint.py + trtllm-build, deprecated upstream in
2026-02 and removed from TensorRT-LLM main in 2026-07): the inflight_batcher_llm set, every config
rendered from our templates (no fill_template.py, no `${...}` holes):
    <name>/                  ensemble: our tensor names (text_input, max_tokens, stream, temperature,
                             top_p, top_k, seed, stop) -> preprocessing -> tensorrt_llm -> postprocessing
    preprocessing/, postprocessing/, tensorrt_llm_bls/   python models; their model.py (and lib/) are
                             TensorRT-LLM's, copied from /app/all_models/inflight_batcher_llm/ in the image
    tensorrt_llm/            backend "tensorrtllm"; the engine in tensorrt_llm/1/ from trtllm-build
The internal names are fixed: tensorrt_llm_bls calls "preprocessing" and "postprocessing" by name, so a
repository holds one engine-flow model.

Conversion and build run inside the serving NGC image through the Docker SDK (or directly when
trtllm-build is on PATH, i.e. inside that image), as builder/convert/onnx2trt.py does for trtexec.
Not executed here: no GPU, Docker, or TensorRT-LLM in this workplace; tests check the exact commands.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import yaml

from builder.deploy import ngc
from builder.errors import RunError, UserError
from builder.targets.common import (DTYPES, MODEL_REPOSITORY, files_under, lint_beam_width, lint_engine_version,
                                    lint_prompt_limit, lint_sequence_limit, lint_streaming, lint_world_size, params,
                                    read_config, resolve, token_ids, write_config)

IMAGE = ngc.TRTLLM_IMAGE
# TensorRT-LLM in the NGC `-trtllm-python-py3` images, from builder.deploy.ngc's table
IMAGE_TRTLLM = {tag: r.tensorrt_llm for tag, r in ngc.RELEASES.items() if r.tensorrt_llm}
APP = "/app/all_models"  # where the trtllm images keep TensorRT-LLM's triton_backend model files
LLMAPI_FILES = ("model.py", "helpers.py")
IFB_PYTHON = ("preprocessing", "postprocessing", "tensorrt_llm_bls")
HF, CKPT = "/hf", "/tmp/ckpt"  # weights mount and checkpoint scratch inside the build container
# convert_checkpoint.py of TensorRT-LLM <= 1.2, by Hugging Face model_type (examples/models/core/<dir>/)
CONVERTERS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen", "qwen": "qwen", "gemma": "gemma", "gpt2": "gpt"}


def _t(name, dtype, dims=(1,), optional=False, scalar=False):
    return {"name": name, "dtype": f"TYPE_{dtype}", "dims": list(dims), "optional": optional, "scalar": scalar}


# --- flow llmapi -------------------------------------------------------------------------------------

LLMAPI_INPUTS = [_t("text_input", "STRING", (-1,)), _t("streaming", "BOOL", optional=True)] + [
    _t(f"sampling_param_{n}", d, dims, optional=True) for n, d, dims in (
        ("best_of", "INT32", (1,)), ("temperature", "FP32", (1,)), ("top_k", "INT32", (1,)), ("top_p", "FP32", (1,)),
        ("frequency_penalty", "FP32", (1,)), ("presence_penalty", "FP32", (1,)), ("max_tokens", "INT32", (1,)),
        ("stop", "STRING", (-1,)), ("seed", "UINT64", (1,)), ("exclude_input_from_output", "BOOL", (1,)),
        ("return_perf_metrics", "BOOL", (1,)))] + [
    _t(n, "BOOL", optional=True) for n in ("return_finish_reason", "return_stop_reason", "return_cumulative_logprob",
                                           "stop")]
LLMAPI_OUTPUTS = [_t("text_output", "STRING", (-1,)), _t("finish_reason", "STRING", (-1,)),
                  _t("stop_reason", "STRING", (-1,)), _t("cumulative_logprob", "FP32", (-1,))] + [
    _t(n, "INT32", (-1,)) for n in ("kv_cache_reused_block", "kv_cache_missed_block", "kv_cache_alloc_new_blocks",
                                    "kv_cache_alloc_total_blocks")] + [_t("kv_cache_hit_rate", "FP32", (-1,))] + [
    _t(n, "INT64") for n in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")
] + [_t("acceptance_rate", "FP32"), _t("total_accepted_draft_tokens", "INT32"), _t("total_draft_tokens", "INT32")]


def max_num_tokens(g) -> int:
    """Tokens one engine step takes: a prefill chunk (or a whole prompt without chunking), at least one per slot."""
    chunked = g.prefill_chunk < g.max_prompt_tokens
    return max(g.prefill_chunk if chunked else g.max_prompt_tokens, g.max_sequences)


def llm_args(*, model: str, tokenizer: str | None, precision: str, generation) -> dict:
    """model.yaml: keyword arguments of TensorRT-LLM's LLM() (PyTorch backend) and triton_config."""
    if precision in ("int8", "int4"):
        raise UserError(f"format tensorrt-llm, precision {precision}: the LLM API's PyTorch backend reads quantization "
                        "from a pre-quantized (ModelOpt) checkpoint and does not quantize on load; give such a "
                        "checkpoint with precision bf16, or set flow: engine for weight-only int8/int4")
    g = generation
    args = {"model": model}
    if tokenizer is not None:
        args["tokenizer"] = tokenizer
    args |= {
        "backend": "pytorch", "dtype": DTYPES[precision],
        "tensor_parallel_size": g.tensor_parallel, "pipeline_parallel_size": g.pipeline_parallel,
        "max_batch_size": g.max_sequences, "max_input_len": g.max_prompt_tokens, "max_seq_len": g.max_total_tokens,
        "max_num_tokens": max_num_tokens(g), "enable_chunked_prefill": g.prefill_chunk < g.max_prompt_tokens,
        "kv_cache_config": {"free_gpu_memory_fraction": g.gpu_memory_fraction},
        "triton_config": {"max_batch_size": 0, "decoupled": True},
    }
    return args


def _copy(sources: list[str], dest: str) -> list[str]:
    return ["cp", "-r", *sources, dest]


def llmapi_setup_steps(name: str, model_repository: str = MODEL_REPOSITORY) -> list[list[str]]:
    src = f"{APP}/llmapi/tensorrt_llm/1"
    return [_copy([f"{src}/{f}" for f in LLMAPI_FILES], f"{model_repository}/{name}/1/")]


# --- flow engine (inflight_batcher_llm) --------------------------------------------------------------

PRE_INPUTS = [_t("QUERY", "STRING"), _t("REQUEST_OUTPUT_LEN", "INT32"),
              _t("BAD_WORDS_DICT", "STRING", (-1,), True), _t("STOP_WORDS_DICT", "STRING", (-1,), True),
              _t("EMBEDDING_BIAS_WORDS", "STRING", (-1,), True), _t("EMBEDDING_BIAS_WEIGHTS", "FP32", (-1,), True),
              _t("END_ID", "INT32", optional=True), _t("PAD_ID", "INT32", optional=True)]
# every output preprocessing's initialize() looks up by name
PRE_OUTPUTS = [_t("INPUT_ID", "INT32", (-1,)), _t("REQUEST_INPUT_LEN", "INT32"), _t("DECODER_INPUT_ID", "INT32", (-1,)),
               _t("REQUEST_DECODER_INPUT_LEN", "INT32"), _t("BAD_WORDS_IDS", "INT32", (2, -1)),
               _t("STOP_WORDS_IDS", "INT32", (2, -1)), _t("EMBEDDING_BIAS", "FP32", (-1,)),
               _t("REQUEST_OUTPUT_LEN", "INT32", (-1,)), _t("OUT_END_ID", "INT32"), _t("OUT_PAD_ID", "INT32"),
               _t("OUT_PROMPT_TABLE_EXTRA_IDS", "UINT64", (-1,)), _t("PIXEL_VALUES", "FP16", (-1, -1, -1, -1)),
               _t("IMAGE_SIZES", "INT64", (2,))]
POST_INPUTS = [_t("TOKENS_BATCH", "INT32", (-1, -1)), _t("SEQUENCE_LENGTH", "INT32", (-1,))]
POST_OUTPUTS = [_t("OUTPUT", "STRING", (-1,))]
LLM_INPUTS = [_t("input_ids", "INT32", (-1,)), _t("input_lengths", "INT32", scalar=True),
              _t("request_output_len", "INT32", scalar=True)] + [
    _t(n, d, dims, optional=True, scalar=dims == (1,)) for n, d, dims in (
        ("end_id", "INT32", (1,)), ("pad_id", "INT32", (1,)), ("stop_words_list", "INT32", (2, -1)),
        ("bad_words_list", "INT32", (2, -1)), ("embedding_bias", "FP32", (-1,)), ("beam_width", "INT32", (1,)),
        ("temperature", "FP32", (1,)), ("runtime_top_k", "INT32", (1,)), ("runtime_top_p", "FP32", (1,)),
        ("seed", "UINT64", (1,)), ("exclude_input_in_output", "BOOL", (1,)), ("return_num_input_tokens", "BOOL", (1,)),
        ("return_num_output_tokens", "BOOL", (1,)), ("streaming", "BOOL", (1,)), ("stop", "BOOL", (1,)))]
LLM_OUTPUTS = [_t("output_ids", "INT32", (-1, -1)), _t("sequence_length", "INT32", (-1,)),
               _t("cum_log_probs", "FP32", (-1,)), _t("output_log_probs", "FP32", (-1, -1)),
               _t("batch_index", "INT32"), _t("sequence_index", "INT32"),
               _t("num_input_tokens", "INT32"), _t("num_output_tokens", "INT32")]
BLS_INPUTS = [_t("text_input", "STRING"), _t("max_tokens", "INT32")] + [
    _t(n, d, dims, optional=True) for n, d, dims in (
        ("bad_words", "STRING", (-1,)), ("stop_words", "STRING", (-1,)), ("exclude_input_in_output", "BOOL", (1,)),
        ("end_id", "INT32", (1,)), ("pad_id", "INT32", (1,)), ("top_k", "INT32", (1,)), ("top_p", "FP32", (1,)),
        ("temperature", "FP32", (1,)), ("seed", "UINT64", (1,)), ("beam_width", "INT32", (1,)),
        ("stream", "BOOL", (1,)))]
BLS_OUTPUTS = [_t("text_output", "STRING", (-1,)), _t("cum_log_probs", "FP32", (-1,)),
               _t("output_log_probs", "FP32", (-1, -1)), _t("context_logits", "FP32", (-1, -1)),
               _t("generation_logits", "FP32", (-1, -1, -1)), _t("batch_index", "INT32"), _t("sequence_index", "INT32")] + [
    _t(n, "INT32") for n in ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks")] + [
    _t(n, "INT64") for n in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")
] + [_t("acceptance_rate", "FP32"), _t("total_accepted_draft_tokens", "INT32"), _t("total_draft_tokens", "INT32")]
# the client-facing ensemble: our endpoint's names where the engine has the feature
ENSEMBLE_INPUTS = [_t("text_input", "STRING"), _t("max_tokens", "INT32")] + [
    _t(n, d, dims, optional=True) for n, d, dims in (
        ("stream", "BOOL", (1,)), ("temperature", "FP32", (1,)), ("top_p", "FP32", (1,)), ("top_k", "INT32", (1,)),
        ("seed", "UINT64", (1,)), ("stop", "STRING", (-1,)), ("exclude_input_in_output", "BOOL", (1,)),
        ("return_num_input_tokens", "BOOL", (1,)), ("return_num_output_tokens", "BOOL", (1,)),
        ("beam_width", "INT32", (1,)))]
ENSEMBLE_OUTPUTS = [_t("text_output", "STRING", (-1,)), _t("num_input_tokens", "INT32"), _t("num_output_tokens", "INT32")]
ENSEMBLE_STEPS = [
    {"model": "preprocessing",
     "inputs": {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "STOP_WORDS_DICT": "stop"},
     "outputs": {"INPUT_ID": "_INPUT_ID", "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
                 "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN", "STOP_WORDS_IDS": "_STOP_WORDS_IDS",
                 "OUT_END_ID": "_END_ID", "OUT_PAD_ID": "_PAD_ID"}},
    {"model": "tensorrt_llm",
     "inputs": {"input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN", "request_output_len": "_REQUEST_OUTPUT_LEN",
                "end_id": "_END_ID", "pad_id": "_PAD_ID", "stop_words_list": "_STOP_WORDS_IDS", "streaming": "stream",
                "temperature": "temperature", "runtime_top_p": "top_p", "runtime_top_k": "top_k", "seed": "seed",
                "exclude_input_in_output": "exclude_input_in_output", "beam_width": "beam_width",
                "return_num_input_tokens": "return_num_input_tokens",
                "return_num_output_tokens": "return_num_output_tokens"},
     "outputs": {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH",
                 "num_input_tokens": "num_input_tokens", "num_output_tokens": "num_output_tokens"}},
    {"model": "postprocessing", "inputs": {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
     "outputs": {"OUTPUT": "text_output"}},
]


def converter_for(model_type: str) -> str:
    if model_type not in CONVERTERS:
        raise UserError(f"flow engine: no TensorRT-LLM checkpoint converter is known for model_type {model_type!r} "
                        f"(known: {', '.join(sorted(CONVERTERS))}); use flow: llmapi")
    return f"/app/examples/models/core/{CONVERTERS[model_type]}/convert_checkpoint.py"


def engine_steps(*, model_type: str, precision: str, generation, engine_dir: str) -> list[list[str]]:
    """The exact command lines of the legacy build, run in the serving image: version, convert, build."""
    g = generation
    weight_only = ["--use_weight_only", "--weight_only_precision", precision] if precision in ("int8", "int4") else []
    dtype = DTYPES.get(precision, "bfloat16")
    return [
        ["python3", "-c", "import tensorrt_llm; print('tensorrt_llm', tensorrt_llm.__version__)"],
        ["python3", converter_for(model_type), "--model_dir", HF, "--output_dir", CKPT, "--dtype", dtype,
         "--tp_size", str(g.tensor_parallel), "--pp_size", str(g.pipeline_parallel), *weight_only],
        ["trtllm-build", "--checkpoint_dir", CKPT, "--output_dir", engine_dir, "--gemm_plugin", "auto",
         "--max_batch_size", str(g.max_sequences), "--max_input_len", str(g.max_prompt_tokens),
         "--max_seq_len", str(g.max_total_tokens), "--max_num_tokens", str(max_num_tokens(g)),
         "--max_beam_width", "1", "--use_paged_context_fmha", "enable"],
    ]


def ifb_setup_steps(model_repository: str = MODEL_REPOSITORY) -> list[list[str]]:
    return [_copy([f"{APP}/inflight_batcher_llm/{m}/1/."], f"{model_repository}/{m}/1/") for m in IFB_PYTHON]


def script(steps: list[list[str]]) -> str:
    return " && ".join(shlex.join(s) for s in steps)


def container_spec(repo: Path, steps: list[list[str]], *, image: str = IMAGE, weights_dir: Path | None = None) -> dict:
    """Keyword arguments for docker's containers.run: the steps in the serving image, the repository at
    /models (read-write, the engine is written there), the weights at /hf (read-only), all GPUs."""
    from docker.types import DeviceRequest

    volumes = {str(Path(repo).resolve()): {"bind": MODEL_REPOSITORY, "mode": "rw"}}
    if weights_dir is not None:
        volumes[str(Path(weights_dir).resolve())] = {"bind": HF, "mode": "ro"}
    return dict(image=image, command=["bash", "-c", script(steps)], volumes=volumes,
                device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])], detach=True, shm_size="2g",
                labels={"triton-builder": "hf2trtllm"})


def docker_command(repo: Path, steps: list[list[str]], *, image: str = IMAGE, weights_dir: Path | None = None) -> str:
    """The same run as one `docker run` line, for the manifest and for rerunning a failed step by hand."""
    mounts = [f"-v {Path(repo).resolve()}:{MODEL_REPOSITORY}"]
    if weights_dir is not None:
        mounts.append(f"-v {Path(weights_dir).resolve()}:{HF}:ro")
    return (f"docker run --rm --gpus all --shm-size=2g {' '.join(mounts)} {image} "
            f"bash -c {shlex.quote(script(steps))}")


def run_steps(repo: Path, steps: list[list[str]], *, image: str = IMAGE, weights_dir: Path | None = None) -> str:
    """Run the steps: directly when trtllm-build is on PATH (inside the serving image, paths mapped to
    this machine), else in `image` through the Docker SDK. Returns the output; RunError with its tail."""
    if shutil.which("trtllm-build"):
        mapping = {MODEL_REPOSITORY: str(Path(repo).resolve()), HF: str(Path(weights_dir).resolve()) if weights_dir else HF}
        local = [[_localize(a, mapping) for a in s] for s in steps]
        proc = subprocess.run(["bash", "-c", script(local)], capture_output=True, text=True, timeout=7200)
        if proc.returncode != 0:
            raise RunError(f"TensorRT-LLM build failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
        return proc.stdout + proc.stderr
    from builder.runtime.docker import run_to_completion

    return run_to_completion(container_spec(repo, steps, image=image, weights_dir=weights_dir),
                             what=f"TensorRT-LLM build in {image}", timeout=7200)


def _localize(arg: str, mapping: dict[str, str]) -> str:
    for inside, outside in mapping.items():
        if arg == inside or arg.startswith(inside + "/"):
            return outside + arg[len(inside):]
    return arg


def tensorrt_llm_version(log: str) -> str:
    match = re.search(r"^tensorrt_llm (\S+)$", log, re.M)
    if not match:
        raise RunError("the build did not print the TensorRT-LLM version; cannot record what the engine needs")
    return match.group(1)


def image_version(image: str) -> str | None:
    match = re.search(r":(\d\d\.\d\d)-trtllm", image)
    return IMAGE_TRTLLM.get(match.group(1)) if match else None


# --- render ------------------------------------------------------------------------------------------

def render(repo: Path, *, name: str, weights: str, tokenizer: str | None, precision: str, generation, serving: dict,
           flow: str = "llmapi", image: str = IMAGE, model_repository: str = MODEL_REPOSITORY) -> dict:
    """Write the model directories under repo; return {triton model name: manifest entry}.

    flow engine: `weights` is a local Hugging Face directory (absolute, or relative to the repository),
    only read by the build; the build itself is `build_engine(repo, entry)`, run where Docker or
    TensorRT-LLM is."""
    repo = Path(repo)
    where = f"{name} (format tensorrt-llm, flow {flow})"
    if flow == "llmapi":
        return _render_llmapi(repo, name, weights, tokenizer, precision, generation, image, model_repository, where)
    if flow != "engine":
        raise UserError(f"{where}: flow must be llmapi or engine")
    return _render_engine(repo, name, weights, tokenizer, precision, generation, image, model_repository, where)


def _render_llmapi(repo, name, weights, tokenizer, precision, generation, image, model_repository, where) -> dict:
    model = resolve(repo, weights, where=where, model_repository=model_repository)
    tok = resolve(repo, tokenizer, where=where, model_repository=model_repository) if tokenizer else None
    args = llm_args(model=model, tokenizer=tok, precision=precision, generation=generation)
    write_config(repo / name / "config.pbtxt", "llm/model.pbtxt.j2", name=name, backend="python", max_batch_size=None,
                 decoupled=None, dynamic_batching=None, inputs=LLMAPI_INPUTS, outputs=LLMAPI_OUTPUTS,
                 instance_kind="KIND_CPU", instance_count=1, parameters={})
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "1" / "model.yaml").write_text(yaml.safe_dump(args, sort_keys=False))
    setup = llmapi_setup_steps(name, model_repository)
    return {name: {
        "role": "llm", "target": "tensorrt-llm", "flow": "llmapi", "precision": precision,
        "files": files_under(repo, name),
        "settings": {"llm_args": args, "generation": generation.model_dump(), "image": image,
                     "tensorrt_llm": image_version(image)},
        "commands": {"setup": docker_command(repo, setup, image=image), "serve": serve_command(repo, image)},
    }}


def _render_engine(repo, name, weights, tokenizer, precision, generation, image, model_repository, where) -> dict:
    weights_dir = (repo / weights).resolve()
    if not (weights_dir / "config.json").is_file():
        raise UserError(f"{where}: the engine flow converts a local Hugging Face directory; {weights_dir} has no "
                        "config.json (give source: path or package)")
    model_type = json.loads((weights_dir / "config.json").read_text()).get("model_type", "?")
    if tokenizer is None or not (repo / tokenizer).is_dir():
        raise UserError(f"{where}: the engine flow's preprocessing and postprocessing need the tokenizer files inside "
                        "the repository; copy them there and give tokenizer")
    converter_for(model_type)
    ids = token_ids(repo / tokenizer, where)
    g = generation
    tok = f"{model_repository}/{tokenizer}"
    engine_dir = f"{model_repository}/tensorrt_llm/1"
    batching = {"max_queue_delay_us": 0}
    common = dict(max_batch_size=g.max_sequences, instance_kind="KIND_CPU", instance_count=1)
    models = {
        "preprocessing": dict(backend="python", decoupled=None, dynamic_batching=batching, inputs=PRE_INPUTS,
                              outputs=PRE_OUTPUTS, parameters={"tokenizer_dir": tok, "add_special_tokens": "true",
                                                               "multimodal_model_path": "", "gpt_model_path": engine_dir}),
        "tensorrt_llm": dict(backend="tensorrtllm", decoupled=True, dynamic_batching=batching, inputs=LLM_INPUTS,
                             outputs=LLM_OUTPUTS, parameters={
                                 "gpt_model_type": "inflight_fused_batching", "gpt_model_path": engine_dir,
                                 "max_beam_width": "1", "batch_scheduler_policy": "guaranteed_no_evict",
                                 "kv_cache_free_gpu_mem_fraction": str(g.gpu_memory_fraction),
                                 "enable_chunked_context": "true" if g.prefill_chunk < g.max_prompt_tokens else "false",
                                 "exclude_input_in_output": "true"}),
        "postprocessing": dict(backend="python", decoupled=None, dynamic_batching=batching, inputs=POST_INPUTS,
                               outputs=POST_OUTPUTS, parameters={"tokenizer_dir": tok, "skip_special_tokens": "true"}),
        "tensorrt_llm_bls": dict(backend="python", decoupled=True, dynamic_batching=None, inputs=BLS_INPUTS,
                                 outputs=BLS_OUTPUTS, parameters={
                                     "accumulate_tokens": "false", "tensorrt_llm_model_name": "tensorrt_llm",
                                     "tensorrt_llm_draft_model_name": "", "multimodal_encoders_name": ""}),
    }
    if name in models:
        raise UserError(f"{where}: the name {name!r} is taken by the inflight_batcher_llm set; rename the model")
    for model, values in models.items():
        write_config(repo / model / "config.pbtxt", "llm/model.pbtxt.j2", name=model, **common, **values)
        (repo / model / "1").mkdir(parents=True, exist_ok=True)
    write_config(repo / name / "config.pbtxt", "llm/ensemble.pbtxt.j2", name=name, max_batch_size=g.max_sequences,
                 inputs=ENSEMBLE_INPUTS, outputs=ENSEMBLE_OUTPUTS, steps=ENSEMBLE_STEPS)
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    steps = engine_steps(model_type=model_type, precision=precision, generation=g, engine_dir=engine_dir)
    setup = ifb_setup_steps(model_repository)
    settings = {"generation": g.model_dump(), "image": image, "tensorrt_llm": image_version(image),
                "max_beam_width": 1, "tokens": ids, "weights_dir": str(weights_dir), "model_type": model_type}
    entries = {name: {"role": "ensemble", "target": "tensorrt-llm", "flow": "engine", "precision": precision,
                      "steps": [s["model"] for s in ENSEMBLE_STEPS], "files": files_under(repo, name),
                      "settings": settings,
                      "commands": {"build": docker_command(repo, steps + setup, image=image, weights_dir=weights_dir),
                                   "serve": serve_command(repo, image)}}}
    for model in models:
        entries[model] = {"role": "llm-part", "target": "tensorrt-llm", "flow": "engine", "of": name,
                          "files": files_under(repo, model)}
    return entries


def build_engine(repo: Path, entry: dict) -> dict:
    """Run the legacy build for an engine-flow entry (the ensemble's): the engine into tensorrt_llm/1/, the
    python model files into place. Records and returns {tensorrt_llm, image, commands}."""
    settings = entry["settings"]
    g = SimpleNamespace(**settings["generation"])  # the spec's generation: block as the build recorded it
    image, weights_dir = settings["image"], Path(settings["weights_dir"])
    steps = engine_steps(model_type=settings["model_type"], precision=entry["precision"], generation=g,
                         engine_dir=f"{MODEL_REPOSITORY}/tensorrt_llm/1") + ifb_setup_steps()
    log = run_steps(repo, steps, image=image, weights_dir=weights_dir)
    record = {"tensorrt_llm": tensorrt_llm_version(log), "image": None if shutil.which("trtllm-build") else image,
              "commands": steps}
    (Path(repo) / "tensorrt_llm" / "1" / "build.json").write_text(json.dumps(record, indent=1))
    return record


def serve_command(repo: Path, image: str = IMAGE) -> str:
    return (f"docker run --rm --gpus all --shm-size=2g --ulimit memlock=-1 --ulimit stack=67108864 "
            f"-p 8000:8000 -p 8001:8001 -p 8002:8002 -v {Path(repo).resolve()}:{MODEL_REPOSITORY} {image} "
            f"tritonserver --model-repository={MODEL_REPOSITORY}")


# --- check -------------------------------------------------------------------------------------------

def check(model_dir: Path, entry: dict | None = None, *, serving_version: str | None = None, gpus: int | None = None,
          runtime_files: bool = True) -> None:
    """Re-read what render (and the build) wrote; UserError (one line) on the first inconsistency.
    `runtime_files`: also require the files copied from the image (model.py, the engine).
    `serving_version`: the serving container's TensorRT-LLM, when known (default: from the image tag)."""
    model_dir = Path(model_dir)
    if (model_dir / "1" / "model.yaml").is_file():
        return _check_llmapi(model_dir, entry, gpus, runtime_files)
    cfg = read_config(model_dir / "config.pbtxt")
    if cfg.platform == "ensemble" and any(s.model_name == "tensorrt_llm" for s in cfg.ensemble_scheduling.step):
        return _check_engine(model_dir.parent, model_dir.name, entry, serving_version, gpus, runtime_files)
    raise UserError(f"{model_dir.name}: neither a TensorRT-LLM llmapi model (1/model.yaml) nor an inflight_batcher_llm "
                    "ensemble; rebuild the repository")


def _check_llmapi(model_dir: Path, entry, gpus, runtime_files) -> None:
    where = f"{model_dir.name}/1/model.yaml"
    try:
        args = yaml.safe_load((model_dir / "1" / "model.yaml").read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}); rebuild the repository") from None
    if not isinstance(args, dict) or not args.get("model"):
        raise UserError(f"{where}: needs a mapping with 'model' (a hub id or a path)")
    tc = args.get("triton_config")
    if not isinstance(tc, dict) or "decoupled" not in tc or "max_batch_size" not in tc:
        raise UserError(f"{where}: triton_config needs decoupled and max_batch_size (TensorRT-LLM's model.py reads "
                        "both); rebuild the repository")
    lint_streaming(where, bool(tc["decoupled"]))
    cfg = read_config(model_dir / "config.pbtxt")
    if cfg.HasField("model_transaction_policy") or cfg.max_batch_size:
        raise UserError(f"{model_dir.name}/config.pbtxt: sets decoupled or max_batch_size, which TensorRT-LLM's llmapi "
                        "model takes from model.yaml's triton_config; remove them from config.pbtxt")
    lint_world_size(where, int(args.get("tensor_parallel_size", 1)), int(args.get("pipeline_parallel_size", 1)),
                    gpus=gpus)
    if entry is not None:
        g = entry["settings"]["generation"]
        lint_prompt_limit(where, g["max_prompt_tokens"], int(args.get("max_input_len", g["max_prompt_tokens"])))
        built = entry["settings"]["llm_args"]
        changed = sorted(k for k in set(built) | set(args) if built.get(k) != args.get(k))
        if changed:
            raise UserError(f"{where}: {', '.join(changed)} differ from the build recorded in triton-builder.json; "
                            "rebuild the repository or change the spec")
    if runtime_files:
        missing = [f for f in LLMAPI_FILES if not (model_dir / "1" / f).is_file()]
        if missing:
            raise UserError(f"{model_dir.name}/1: {', '.join(missing)} missing (TensorRT-LLM's llmapi model files); "
                            "copy them from the serving image with the manifest's setup command")


def _check_engine(repo: Path, name: str, entry, serving_version, gpus, runtime_files) -> None:
    cfgs = {m: read_config(repo / m / "config.pbtxt") for m in ("preprocessing", "tensorrt_llm", "postprocessing",
                                                                   "tensorrt_llm_bls")}
    llm = cfgs["tensorrt_llm"]
    p = params(llm)
    for m in ("tensorrt_llm", "tensorrt_llm_bls"):
        lint_streaming(f"{m}/config.pbtxt", cfgs[m].model_transaction_policy.decoupled)
    if p.get("gpt_model_type") not in ("V1", "inflight_batching", "inflight_fused_batching"):
        raise UserError(f"tensorrt_llm/config.pbtxt: gpt_model_type {p.get('gpt_model_type')!r} is not V1, "
                        "inflight_batching or inflight_fused_batching; the backend refuses anything else")
    for m in ("preprocessing", "postprocessing"):
        if not params(cfgs[m]).get("tokenizer_dir"):
            raise UserError(f"{m}/config.pbtxt: parameters.tokenizer_dir is empty; give the tokenizer's directory")
    if not runtime_files:
        return
    for m in IFB_PYTHON:
        if not (repo / m / "1" / "model.py").is_file():
            raise UserError(f"{m}/1/model.py: missing (TensorRT-LLM's model file); copy it from the serving image "
                            f"with the manifest's build command ({name})")
    engine = repo / "tensorrt_llm" / "1" / "config.json"
    if not engine.is_file():
        raise UserError(f"tensorrt_llm/1: no engine (config.json); build it with the manifest's build command ({name})")
    built = json.loads(engine.read_text())
    bc, mapping = built.get("build_config", {}), built.get("pretrained_config", {}).get("mapping", {})
    where = "tensorrt_llm/1/config.json"
    image = entry["settings"]["image"] if entry else None
    lint_engine_version(where, str(built.get("version")), serving_version or (image_version(image) if image else None),
                        image)
    lint_beam_width("tensorrt_llm/config.pbtxt", int(p.get("max_beam_width", "1")), int(bc.get("max_beam_width", 1)))
    if entry is not None:
        g = entry["settings"]["generation"]
        lint_prompt_limit(where, g["max_prompt_tokens"], int(bc.get("max_input_len", 0)))
        lint_sequence_limit(where, g["max_total_tokens"], int(bc.get("max_seq_len", 0)))
        lint_world_size(where, g["tensor_parallel"], g["pipeline_parallel"],
                        world_size=mapping.get("world_size"), gpus=gpus)
