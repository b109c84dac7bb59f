"""Formats `tensorrt-llm` and `vllm` for the generation endpoint: render-only repositories for Triton's LLM
backends (builder.targets). Each writes its own model set (a TensorRT-LLM engine flow makes several
models), so the record's `build` makes the whole variant; nothing of it runs here (no runner, not
in-process, recorded as rendered)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from builder.formats.base import PENALTIES, Format, GenerationRequest, refuse_unhonoured, register


def build(job) -> dict[str, dict]:
    """The target's model set under job.ctx.stage, with a manifest entry per model. Local sources are saved
    as a Hugging Face directory inside the model's folder, so the repository is whole."""
    import torch

    from builder.generation import TORCH_DTYPES
    from builder.repository import file_records
    from builder.targets import TARGETS

    model, variant, stage, src = job.model, job.variant, job.ctx.stage, job.part.source
    t0 = time.time()
    if model.source.hf:
        weights = tokenizer = model.source.hf
    else:
        folder = job.model_dir / "hf"
        dtype = getattr(torch, TORCH_DTYPES.get(variant.precision, "bfloat16"))
        module = src.module
        # a GGUF checkpoint loads dequantized but keeps a quantizer that refuses to save: save plain weights
        quantizer, module.hf_quantizer = getattr(module, "hf_quantizer", None), None
        quantization = module.config.__dict__.pop("quantization_config", None)
        try:
            module.to(dtype).save_pretrained(folder)
        finally:
            module.to(torch.float32)
            module.hf_quantizer = quantizer
            if quantization is not None:
                module.config.quantization_config = quantization
        src.tokenizer.save_pretrained(folder)
        weights = tokenizer = f"{job.name}/hf"
    options = {"flow": variant.flow} if "flow" in job.fmt.options else {}
    made = TARGETS[variant.format].render(stage, name=job.name, weights=weights, tokenizer=tokenizer,
                                          precision=variant.precision, generation=model.generation,
                                          serving=job.serving, **options)
    return {n: {"precision": variant.precision, **e, "model": model.name, "part": "", "task": model.task,
                "format": variant.format, "flow": variant.flow, "generation": model.generation.model_dump(),
                "status": "rendered", "source": job.source, "files": file_records(stage / n), "command": job.rebuild,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 2)}
            for n, e in made.items()}


# The vLLM backend (triton-inference-server/vllm_backend src/model.py auto_complete_config, src/utils/request.py):
# sampling settings as one JSON string of SamplingParams keywords; finish_reason and the token counts only when
# asked with return_* (counts UINT32, num_output_tokens per response: request.py's prev_lens_num_output_tokens);
# streaming refuses a prompt echoed back, so exclude_input_in_output is always sent.
VLLM_FIELDS = frozenset({"text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "seed", "stop",
                         "ignore_eos", "min_tokens", "logprobs", "guide", *PENALTIES})
# SamplingParams' own names (the backend builds SamplingParams(**json.loads(sampling_parameters)))
VLLM_SAMPLING = ("max_tokens", "min_tokens", "ignore_eos", "temperature", "top_p", "top_k", "seed", *PENALTIES)


def vllm_request(fields: dict, flow: str = "") -> GenerationRequest:
    """Temperature absent: 0 (greedy, as on our endpoint; vLLM's own default samples at 1.0)."""
    refuse_unhonoured(fields, VLLM_FIELDS, "the vLLM backend")
    params = {k: fields[k] for k in VLLM_SAMPLING if k in fields}
    params.setdefault("temperature", 0.0)
    if fields.get("stop"):
        params["stop"] = list(fields["stop"])
    if "logprobs" in fields:
        params["logprobs"] = fields["logprobs"]
    guide = fields.get("guide")
    if guide is not None:  # StructuredOutputsParams (vllm_backend src/utils/vllm_backend_utils.py reads a JSON string)
        params["structured_outputs"] = json.dumps({"json": guide["json_schema"]} if "json_schema" in guide
                                                  else {"json_object": True})
    inputs = {"text_input": [fields["text_input"]], "stream": [bool(fields.get("stream", False))],
              "sampling_parameters": [json.dumps(params)], "exclude_input_in_output": [True],
              "return_finish_reason": [True], "return_num_input_tokens": [True], "return_num_output_tokens": [True]}
    if "logprobs" in fields:
        inputs["return_logprobs"] = [True]
    types = {n: "BYTES" if n in ("text_input", "sampling_parameters") else "BOOL" for n in inputs}
    return GenerationRequest(inputs, types, counts="delta", logprobs=fields.get("logprobs"))


# TensorRT-LLM's llmapi model (triton_backend/all_models/llmapi/tensorrt_llm/1/helpers.py
# get_sampling_params_from_request): sampling_param_* scalars, sampling_param_stop a list of strings, `streaming`;
# no token counts, and text_output is the whole text so far (RequestOutput.outputs[i].text), not the new piece.
# The legacy engine ensemble (ours, builder.targets.trtllm ENSEMBLE_INPUTS): our names, batched (max_batch_size
# > 0), max_tokens required, no finish_reason; num_output_tokens counts the response's own tokens.
TRTLLM_FIELDS = frozenset({"text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "seed", "stop"})
TRTLLM_TYPES = {"max_tokens": "INT32", "temperature": "FP32", "top_p": "FP32", "top_k": "INT32", "seed": "UINT64"}


def trtllm_request(fields: dict, flow: str = "llmapi") -> GenerationRequest:
    """Temperature absent: left to TensorRT-LLM's default (greedy when no sampling setting is given)."""
    refuse_unhonoured(fields, TRTLLM_FIELDS, f"the TensorRT-LLM {flow} model")
    stream = bool(fields.get("stream", False))
    sampling = {k: fields[k] for k in TRTLLM_TYPES if k in fields}
    stop = list(fields.get("stop") or [])
    if flow == "llmapi":
        inputs = {"text_input": [fields["text_input"]], "streaming": [stream],
                  **{f"sampling_param_{k}": [v] for k, v in sampling.items()},
                  "sampling_param_exclude_input_from_output": [True], "return_finish_reason": [True]}
        types = {"text_input": "BYTES", "streaming": "BOOL", "sampling_param_exclude_input_from_output": "BOOL",
                 "return_finish_reason": "BOOL", **{f"sampling_param_{k}": TRTLLM_TYPES[k] for k in sampling}}
        if stop:
            inputs["sampling_param_stop"], types["sampling_param_stop"] = stop, "BYTES"
        return GenerationRequest(inputs, types, text="total", counts=None)
    if "max_tokens" not in fields:
        raise Unhonoured("max_tokens", "the TensorRT-LLM engine ensemble needs max_tokens")
    inputs = {"text_input": [fields["text_input"]], **{k: [v] for k, v in sampling.items()}, "stream": [stream],
              "exclude_input_in_output": [True], "return_num_input_tokens": [True], "return_num_output_tokens": [True]}
    types = {"text_input": "BYTES", **{k: TRTLLM_TYPES[k] for k in sampling}, "stream": "BOOL",
             "exclude_input_in_output": "BOOL", "return_num_input_tokens": "BOOL", "return_num_output_tokens": "BOOL"}
    if stop:
        inputs["stop"], types["stop"] = stop, "BYTES"
    return GenerationRequest(inputs, types, batched=True, counts="delta", finish_reason=False)


def _export(job) -> tuple[Path, str]:
    raise NotImplementedError("an LLM target is made by its `build`")  # never called: build.py takes `build`


register(Format("tensorrt-llm", "model.yaml", _export, endpoint="generation", build=build, in_process=False,
                options=("flow",), request=trtllm_request, honours=lambda flow: TRTLLM_FIELDS))
register(Format("vllm", "model.json", _export, endpoint="generation", build=build, in_process=False,
                request=vllm_request, honours=lambda flow: VLLM_FIELDS))
