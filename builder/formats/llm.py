"""Formats `tensorrt-llm` and `vllm` for the generation endpoint: render-only repositories for Triton's LLM
backends (builder.targets). Each writes its own model set (a TensorRT-LLM engine flow makes several
models), so the record's `build` makes the whole variant; nothing of it runs here (no runner, not
in-process, recorded as rendered)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from builder.formats.base import Format, register


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


def vllm_request(text: str, output_tokens: int, sampling: dict, flow: str) -> dict:
    """vLLM's backend: sampling settings travel as one JSON string; streaming needs exclude_input_in_output."""
    params = {"max_tokens": output_tokens, "min_tokens": output_tokens, "ignore_eos": True, **sampling}
    return {"text_input": [text], "stream": [True], "sampling_parameters": [json.dumps(params)],
            "exclude_input_in_output": [True], "return_num_output_tokens": [True]}


def trtllm_request(text: str, output_tokens: int, sampling: dict, flow: str) -> dict:
    """TensorRT-LLM: the llmapi model's sampling_param_* inputs, or the engine flow's ensemble inputs; max_tokens
    only (its output may stop earlier: tokens are then counted from the responses)."""
    if flow == "llmapi":
        return {"text_input": [text], "streaming": [True], "sampling_param_max_tokens": [output_tokens],
                "sampling_param_exclude_input_from_output": [True],
                **{f"sampling_param_{k}": [v] for k, v in sampling.items()}}
    return {"text_input": [text], "max_tokens": [output_tokens], "stream": [True], **{k: [v] for k, v in sampling.items()}}


def _export(job) -> tuple[Path, str]:
    raise NotImplementedError("an LLM target is made by its `build`")  # never called: build.py takes `build`


register(Format("tensorrt-llm", "model.yaml", _export, endpoint="generation", build=build, in_process=False,
                options=("flow",), request=trtllm_request))
register(Format("vllm", "model.json", _export, endpoint="generation", build=build, in_process=False,
                request=vllm_request))
