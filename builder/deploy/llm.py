"""The LLMs of a built repository, as the Dynamo and KServe LLM targets need them: which engine serves
each one, what model it loads, its limits and its GPUs. Read from the manifest entries the LLM targets
and the generation build wrote (builder/targets, builder/generation); nothing is re-derived from a spec.

    engine "vllm"    a `format: vllm` variant: Dynamo's vLLM worker / KServe's vLLM load its model.json
    engine "trtllm"  a `format: tensorrt-llm` (llmapi flow) variant: Dynamo's TensorRT-LLM worker loads
                     the LLM() arguments of its model.yaml
    engine "triton"  any other text-generation model (the torch generation model, a legacy engine-flow
                     ensemble): served by Triton itself, behind Dynamo's frontend over KServe gRPC
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import UserError
from builder.manifest import read_manifest
from builder.targets.common import MODEL_REPOSITORY


@dataclass(frozen=True)
class LLM:
    name: str  # the Triton model name, served under that name
    engine: str  # vllm, trtllm, triton
    model: str | None  # hub id or path in the container (/models/...); None for engine triton
    max_model_len: int
    max_num_seqs: int
    gpu_memory_utilization: float
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    args: dict = field(default_factory=dict)  # the engine's own arguments as built (model.json / model.yaml)

    @property
    def gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def in_repository(self) -> str | None:
        """The model's path relative to the repository root when it is stored there (else a hub id)."""
        prefix = MODEL_REPOSITORY.rstrip("/") + "/"
        return self.model[len(prefix):] if self.model and self.model.startswith(prefix) else None


def find_llms(repo: Path) -> list[LLM]:
    entries = read_manifest(Path(repo)).get("models", {})
    found = []
    for name, e in sorted(entries.items()):
        # "rendered": an LLM target's model set, written but not run by the build
        if e.get("status", "passed") not in ("passed", "rendered") or e.get("role") == "llm-part":
            continue
        settings = e.get("settings") or {}
        gen = settings.get("generation") or e.get("generation")
        if e.get("target") == "vllm":
            a = settings["engine_args"]
            found.append(LLM(name, "vllm", a["model"], int(a["max_model_len"]), int(a["max_num_seqs"]),
                             float(a["gpu_memory_utilization"]), int(a.get("tensor_parallel_size", 1)),
                             int(a.get("pipeline_parallel_size", 1)), dict(a)))
        elif e.get("target") == "tensorrt-llm" and (e.get("flow") or "llmapi") == "llmapi":
            a = settings["llm_args"]
            found.append(LLM(name, "trtllm", a["model"], int(a["max_seq_len"]), int(a["max_batch_size"]),
                             float(a["kv_cache_config"]["free_gpu_memory_fraction"]),
                             int(a.get("tensor_parallel_size", 1)), int(a.get("pipeline_parallel_size", 1)), dict(a)))
        elif gen and (e.get("task") == "text-generation" or e.get("target") == "tensorrt-llm"):
            found.append(LLM(name, "triton", None, int(gen["max_total_tokens"]), int(gen["max_sequences"]),
                             float(gen.get("gpu_memory_fraction", 0.9)), int(gen.get("tensor_parallel", 1)),
                             int(gen.get("pipeline_parallel", 1))))
    return found


def one_engine(llms: list[LLM], target: str) -> str:
    """The engine all of a repository's LLMs share (one Dynamo image / one KServe runtime per deployment)."""
    engines = sorted({m.engine for m in llms})
    if len(engines) > 1:
        raise UserError(f"--target {target}: the repository mixes LLM engines ({', '.join(engines)}: "
                        f"{', '.join(m.name + '=' + m.engine for m in llms)}); deploy one repository per engine")
    return engines[0]
