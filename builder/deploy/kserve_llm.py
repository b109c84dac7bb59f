"""`deploy --target kserve-llm`: a KServe `LLMInferenceService` (serving.kserve.io/v1alpha2), as data.

KServe's LLM path runs vLLM under llm-d: its default LLMInferenceServiceConfig (kserve
config/llmisvcconfig/config-llm-template.yaml) starts `vllm serve /mnt/models` with `$VLLM_ADDITIONAL_ARGS`,
probes `/health` on :8000, and the router's llm-d scheduler picks pods by prefix-cache and load. So this
target serves a `format: vllm` variant, with the limits it was built with; the model is read from the
hub (hf://) or, when it is stored in the repository, from the repository's PersistentVolumeClaim
(`--storage-uri`). Disaggregated: a prefill pool beside the decode pool (the `prefill:` section).
Nothing here was run: no cluster, no GPU.
"""

from __future__ import annotations

from builder.deploy.llm import LLM, one_engine
from builder.errors import UserError


def model_uri(m: LLM, storage_uri: str) -> str:
    if m.in_repository is not None:
        return f"{storage_uri.rstrip('/')}/{m.in_repository}"
    return f"hf://{m.model}"


def _template(m: LLM) -> dict:
    a = m.args
    extra = [f"--max-model-len {m.max_model_len}", f"--max-num-seqs {m.max_num_seqs}",
             f"--gpu-memory-utilization {m.gpu_memory_utilization}", f"--dtype {a.get('dtype', 'auto')}"]
    # tensor / pipeline parallelism: spec.parallelism, which KServe's template turns into vLLM's flags
    if a.get("max_num_batched_tokens"):
        extra.append(f"--max-num-batched-tokens {a['max_num_batched_tokens']}")
    if a.get("quantization"):
        extra.append(f"--quantization {a['quantization']}")
    if a.get("tokenizer") and not str(a["tokenizer"]).startswith("/"):
        extra.append(f"--tokenizer {a['tokenizer']}")  # a hub id; a repository path is not mounted here
    gpus = str(m.gpus)
    return {"containers": [{
        "name": "main",
        "env": [{"name": "VLLM_ADDITIONAL_ARGS", "value": " ".join(extra)}],
        "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
    }]}


def _parallelism(m: LLM) -> dict:
    return {"tensor": m.tensor_parallel} | ({"pipeline": m.pipeline_parallel} if m.pipeline_parallel > 1 else {})


def service(llms: list[LLM], *, name: str, storage_uri: str, disaggregated: bool, min_replicas: int) -> dict:
    if not llms:
        raise UserError("--target kserve-llm: the repository has no LLM (a text-generation model); use --target kserve")
    engine = one_engine(llms, "kserve-llm")
    if engine != "vllm":
        what = ", ".join(m.name for m in llms)
        raise UserError(f"--target kserve-llm: KServe's LLMInferenceService runs vLLM (llm-d), and {what} is "
                        f"{'a TensorRT-LLM variant' if engine == 'trtllm' else 'served by Triton itself'}; add a "
                        "format: vllm variant to the spec, or use --target dynamo or kserve")
    if len(llms) > 1:
        raise UserError(f"--target kserve-llm: one model per LLMInferenceService; the repository has {len(llms)} "
                        f"({', '.join(m.name for m in llms)})")
    m = llms[0]
    spec = {
        "model": {"uri": model_uri(m, storage_uri), "name": m.name},
        "replicas": min_replicas,
        "parallelism": _parallelism(m),
        "router": {"route": {}, "gateway": {}, "scheduler": {}},
        "template": _template(m),
    }
    if disaggregated:
        spec["prefill"] = {"replicas": min_replicas, "template": _template(m), "parallelism": _parallelism(m)}
    return {"apiVersion": "serving.kserve.io/v1alpha2", "kind": "LLMInferenceService",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name,
                                                  "app.kubernetes.io/part-of": "triton-builder"}},
            "spec": spec}
