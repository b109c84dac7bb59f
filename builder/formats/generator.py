"""Format `torch` for the generation endpoint: our decoupled python-backend model (text in / text out,
continuous batching over a KV cache). The artifact is the decoder's weights at the variant's precision;
beside them the model file (templates/python/generator.py), the decoder and engine modules, decoder.json
and the tokenizer. Verified against Hugging Face `generate` (builder.generation.check)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from builder.errors import RunError
from builder.formats.base import FIELDS, PENALTIES, Format, GenerationRequest, refuse_unhonoured, register
from builder.render import render_template

WEIGHTS = "weights.safetensors"


def export(job) -> tuple[Path, str]:
    import torch
    from safetensors.torch import save_file

    from builder import generation

    if job.variant.precision == "int4" and not torch.cuda.is_available():
        raise RunError("torch int4 runs torch's int4 matmul (CUDA only), so it is verified on a GPU; build it on a "
                       "GPU machine, or use int8 here")
    prepared, version = job.part, job.version_dir
    dtype = getattr(torch, generation.TORCH_DTYPES[job.variant.precision])
    save_file({k: (v if k == "inv_freq" else v.to(dtype)) for k, v in prepared.weights.items()}, str(version / WEIGHTS))
    (version / "decoder.json").write_text(prepared.config.to_json())
    shutil.copy2(generation.GENERATOR, version / "model.py")
    for f in generation.RUNTIME_FILES:
        shutil.copy2(f, version / f.name)
    generation.save_tokenizer(prepared.source.tokenizer, version)
    return version / WEIGHTS, job.rebuild


def verify(job, artifact: Path) -> dict:
    """The decoder at the variant's precision against HF generate: logits cosine, greedy agreement,
    perplexity; greedy equality and continuous batching exactly in fp32."""
    import torch

    from builder import generation
    from builder.generation import decoder

    prepared, variant = job.part, job.variant
    device = "cuda" if torch.cuda.is_available() and job.serving["instances"].kind == "gpu" else "cpu"
    job.ctx.console.print(f"  {job.name}: checking {variant.precision} against HF generate on {device}")
    result, problems = generation.check(decoder, prepared.source.tokenizer, prepared.config, prepared.weights,
                                        variant.precision, list(job.samples), list(job.references),
                                        list(prepared.ref_logits), job.model.generation, device=device)
    need_cos = variant.effective_tolerance.min_cosine if variant.precision != "fp32" else None
    need_agree = generation.MIN_AGREEMENT[variant.precision]
    logits_ok = need_cos is None or result["min_cosine"] >= need_cos
    if variant.precision != "fp32" and result["greedy_agreement"] < need_agree:
        problems.append(f"- greedy agreement {result['greedy_agreement']:.3f} < {need_agree}")
    logits = {"name": "logits", "max_abs": result["max_abs"], "max_rel": None, "cosine": result["min_cosine"],
              "passed": logits_ok, "reason": "" if logits_ok else f"cosine {result['min_cosine']:.6f} < {need_cos}"}
    return {"passed": logits_ok and not problems, "verified": True,
            "tolerance": {"min_cosine": need_cos, "min_agreement": need_agree}, "samples": result["prompts"],
            "outputs": {"logits": logits}, "problems": problems, **result}


def reference(job, artifact: Path, check: dict) -> str:
    """reference.json: the prompts as the server gets them and the text this variant answered at build time
    (serve's self-check asks again)."""
    prompts = [{"text": text, "add_special_tokens": special} for text, special, _ in job.part.prompts]
    (job.model_dir / "reference.json").write_text(json.dumps(
        {"prompts": prompts, "texts": check["texts"], "max_tokens": check["new_tokens"]}, indent=1, ensure_ascii=False))
    return "reference.json"


def render(job, artifact: Path) -> bool:
    from builder import generation

    gen, instances = job.model.generation, job.serving["instances"]
    parameters = {
        "max_sequences": gen.max_sequences, "max_prompt_tokens": gen.max_prompt_tokens,
        "max_total_tokens": gen.max_total_tokens, "max_tokens": gen.max_tokens, "prefill_chunk": gen.prefill_chunk,
        "stream_interval": gen.stream_interval, "precision": job.variant.precision, "device": instances.kind,
        "threads": instances.threads, "artifact": artifact.name, "add_special_tokens": "1",
        "cuda_graphs": int(job.variant.cuda_graphs), "compile": job.variant.compile,  # GPU instances only
        "kv_cache": gen.kv_cache, "block_size": gen.block_size, "prefix_caching": int(gen.prefix_caching),
        "cache_tokens": gen.cache_tokens, "gpu_memory_fraction": gen.gpu_memory_fraction,
    }
    text = render_template(
        "generation.pbtxt.j2", f"{job.name}/config.pbtxt", name=job.name,
        inputs=[{"name": n, "type": t, "dims": -1 if n == "stop" else 1, "optional": o} for n, t, o in generation.INPUTS],
        outputs=[{"name": n, "type": t, "dims": 1} for n, t in generation.OUTPUTS],
        instance_kind="KIND_GPU" if instances.kind == "gpu" else "KIND_CPU", instance_count=instances.count,
        parameters={k: str(v) for k, v in parameters.items()})
    (job.model_dir / "config.pbtxt").write_text(text)
    return True


def record(job, artifact: Path) -> dict:
    return {"generation": job.model.generation.model_dump()}


TORCH_FIELDS = frozenset(FIELDS) - {"min_tokens", *PENALTIES}
TORCH_TYPES = {"max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32", "top_p": "FP32", "top_k": "INT32",
               "seed": "UINT64", "ignore_eos": "BOOL", "add_special_tokens": "BOOL"}


def request(fields: dict, flow: str = "") -> GenerationRequest:
    """Our endpoint: the fields are its inputs; logprobs, guide and prompt_ids travel as request parameters."""
    refuse_unhonoured(fields, TORCH_FIELDS, "this endpoint")
    inputs = {"text_input": [fields["text_input"]], **{k: [fields[k]] for k in TORCH_TYPES if k in fields}}
    types = {"text_input": "BYTES", **{k: TORCH_TYPES[k] for k in inputs if k != "text_input"}}
    if fields.get("stop"):
        inputs["stop"], types["stop"] = list(fields["stop"]), "BYTES"
    parameters = {}
    if "logprobs" in fields:
        parameters["logprobs"] = fields["logprobs"]
    if fields.get("guide") is not None:
        parameters["guide"] = json.dumps(fields["guide"])
    if fields.get("prompt_ids") is not None:
        parameters["prompt_ids"] = json.dumps(fields["prompt_ids"])
    return GenerationRequest(inputs, types, parameters)


GENERATOR = register(Format(
    name="torch", artifact=WEIGHTS, export=export, endpoint="generation", verify=verify, reference=reference,
    render=render, record=record, in_process=False, options=("cuda_graphs", "compile"), request=request,
    honours=lambda flow: TORCH_FIELDS,
))
