"""`deploy --target dynamo`: a `DynamoGraphDeployment` (nvidia.com/v1beta1) for NVIDIA Dynamo's Kubernetes
operator, as data.

- vLLM / TensorRT-LLM variants: Dynamo's own workers (`python3 -m dynamo.vllm` / `dynamo.trtllm`) load the
  model with the arguments the variant was built with; the frontend (OpenAI HTTP on :8000) routes with
  the KV-aware router (`DYN_ROUTER_MODE=kv`, workers publish KV events). Aggregated by default;
  `disaggregated` splits prefill and decode workers, the KV cache moving over NIXL.
- Any other repository (the torch generation model, encoders): Triton itself as a Dynamo worker
  (Dynamo's `examples/backends/tritonserver`: the in-process `tritonserver` Python API, one model per
  worker, registered as a tensor model) behind the frontend's KServe gRPC endpoint (:8787,
  round-robin). Its image is built from dynamo/Dockerfile.

Shapes follow Dynamo's own examples (examples/backends/{vllm,trtllm}/deploy/*_router.yaml, disagg_router.yaml)
and the CRD in tests/fixtures/deploy_crds/ (where it was read is recorded there). Nothing here was run:
no cluster, no GPU.
"""

from __future__ import annotations

import json

from builder.deploy.llm import LLM, one_engine
from builder.errors import UserError

DYNAMO_VERSION = "1.6.0"  # NVIDIA Dynamo release, 2026-10
RUNTIME_IMAGES = {"vllm": f"nvcr.io/nvidia/ai-dynamo/vllm-runtime:{DYNAMO_VERSION}",
                  "trtllm": f"nvcr.io/nvidia/ai-dynamo/tensorrtllm-runtime:{DYNAMO_VERSION}"}
# Dynamo's Triton worker, pinned to the commit of ai-dynamo/dynamo whose CRD the tests validate against
DYNAMO_COMMIT = "2a6da14c83617f5412caba5777dbf0e2399e9c5f"
TRITON_WORKER_URL = (f"https://raw.githubusercontent.com/ai-dynamo/dynamo/{DYNAMO_COMMIT}/"
                     "examples/backends/tritonserver/src/tritonworker.py")
HTTP_PORT, KSERVE_GRPC_PORT, SYSTEM_PORT, KV_EVENTS_PORT = 8000, 8787, 9090, 20080
KV_EVENTS = json.dumps({"publisher": "zmq", "topic": "kv-events", "endpoint": f"tcp://*:{KV_EVENTS_PORT}",
                        "enable_kv_cache_events": True}, separators=(",", ":"))
NIXL = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"}, separators=(",", ":"))
HF_SECRET = "hf-token-secret"  # Dynamo's examples' secret holding HF_TOKEN (optional: public models need none)
MODELS_VOLUME = "model-repository"


def _probes(port: str) -> dict:
    return {
        "startupProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 10, "failureThreshold": 90},
        "readinessProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/live", "port": port}, "periodSeconds": 10, "failureThreshold": 3},
    }


def _pvc(storage_uri: str) -> tuple[str, str]:
    """pvc://CLAIM/PATH -> (claim, path inside it)."""
    if not storage_uri.startswith("pvc://"):
        raise UserError(f"--storage-uri {storage_uri}: the dynamo target mounts the repository from a "
                        "PersistentVolumeClaim; give pvc://CLAIM/PATH")
    claim, _, sub = storage_uri[len("pvc://"):].partition("/")
    return claim, sub


def _pod(container: dict, storage_uri: str | None, labels: dict) -> dict:
    spec = {"containers": [container]}
    if storage_uri:
        claim, sub = _pvc(storage_uri)
        container["volumeMounts"] = [{"name": MODELS_VOLUME, "mountPath": "/models", "subPath": sub, "readOnly": True}]
        spec["volumes"] = [{"name": MODELS_VOLUME, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
    return {"metadata": {"labels": labels}, "spec": spec}


def _frontend(image: str, engine: str, labels: dict) -> dict:
    env = [{"name": "DYN_ROUTER_MODE", "value": "round-robin" if engine == "triton" else "kv"},
           {"name": "DYN_HTTP_PORT", "value": str(HTTP_PORT)}]
    ports = [{"name": "http", "containerPort": HTTP_PORT}]
    if engine == "triton":
        env.append({"name": "DYN_KSERVE_GRPC_SERVER", "value": "true"})
        ports.append({"name": "grpc", "containerPort": KSERVE_GRPC_PORT})
    container = {"name": "main", "image": image, "command": ["python3", "-m", "dynamo.frontend"], "env": env,
                 "ports": ports, **_probes("http"),
                 "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}}
    return {"name": "Frontend", "type": "frontend", "replicas": 1,
            "podTemplate": _pod(container, None, labels | {"app.kubernetes.io/component": "frontend"})}


def _engine_args(m: LLM, role: str | None) -> list[str]:
    """Command-line arguments of dynamo.vllm / dynamo.trtllm for one worker (role: None, prefill, decode)."""
    if m.engine == "vllm":
        a = m.args
        args = ["--model", m.model, "--served-model-name", m.name, "--max-model-len", str(m.max_model_len),
                "--max-num-seqs", str(m.max_num_seqs), "--gpu-memory-utilization", str(m.gpu_memory_utilization),
                "--tensor-parallel-size", str(m.tensor_parallel), "--pipeline-parallel-size", str(m.pipeline_parallel),
                "--dtype", str(a.get("dtype", "auto"))]
        if a.get("tokenizer"):
            args += ["--tokenizer", a["tokenizer"]]
        if a.get("max_num_batched_tokens"):
            args += ["--max-num-batched-tokens", str(a["max_num_batched_tokens"])]
        if a.get("quantization"):
            args += ["--quantization", a["quantization"]]
        if role is not None:
            args += ["--disaggregation-mode", role, "--kv-transfer-config", NIXL]
        if role in (None, "prefill"):  # the workers the KV router places prompts on publish their cache
            args += ["--kv-events-config", KV_EVENTS]
        return args
    config = f"/etc/dynamo/engine/{role or 'agg'}.yaml"
    args = ["--model-path", m.model, "--served-model-name", m.name, "--extra-engine-args", config]
    if role is not None:
        args += ["--disaggregation-mode", role]
    if role in (None, "prefill"):
        args += ["--publish-kv-events"]  # for the KV-aware router (formerly --publish-events-and-metrics)
    return args


def trtllm_engine_config(m: LLM, role: str | None) -> dict:
    """--extra-engine-args of dynamo.trtllm: the LLM() arguments the variant was built with (model.yaml
    without the model and Triton's triton_config); disaggregated workers exchange the KV cache."""
    config = {k: v for k, v in m.args.items() if k not in ("model", "tokenizer", "triton_config")}
    if role is not None:
        config["cache_transceiver_config"] = {"backend": "DEFAULT"}
        config["disable_overlap_scheduler"] = role == "prefill"
    return config


def _worker(m: LLM, image: str, role: str | None, labels: dict, storage_uri: str | None, name: str) -> dict:
    module = {"vllm": "dynamo.vllm", "trtllm": "dynamo.trtllm"}[m.engine]
    container = {
        "name": "main", "image": image, "command": ["python3", "-m", module], "args": _engine_args(m, role),
        "env": [{"name": "DYN_SYSTEM_PORT", "value": str(SYSTEM_PORT)}],
        "envFrom": [{"secretRef": {"name": HF_SECRET, "optional": True}}],
        "ports": [{"name": "system", "containerPort": SYSTEM_PORT}], **_probes("system"),
        "resources": {"limits": {"nvidia.com/gpu": str(m.gpus)}, "requests": {"ephemeral-storage": "10Gi"}},
    }
    pod = _pod(container, storage_uri if m.in_repository else None,
               labels | {"app.kubernetes.io/component": role or "worker"})
    if m.engine == "trtllm":
        container.setdefault("volumeMounts", []).append({"name": "engine-config", "mountPath": "/etc/dynamo/engine",
                                                         "readOnly": True})
        pod["spec"].setdefault("volumes", []).append({"name": "engine-config", "configMap": {"name": f"{name}-engine"}})
    return {"name": {None: "Worker", "prefill": "PrefillWorker", "decode": "DecodeWorker"}[role],
            "type": role or "worker", "replicas": 1, "podTemplate": pod}


def _triton_worker(model: str, image: str, gpus: int, labels: dict, index: int) -> dict:
    container = {
        "name": "main", "image": image,
        "command": ["python3", "/workspace/src/tritonworker.py", "--model-repository", "/models", "--model-name",
                    model, "--backend-directory", "/opt/tritonserver/backends", "--log-verbose", "0"],
        "env": [{"name": "DYN_SYSTEM_PORT", "value": str(SYSTEM_PORT)}],
        "ports": [{"name": "system", "containerPort": SYSTEM_PORT}], **_probes("system"),
        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {"requests": {"cpu": "2", "memory": "4Gi"}},
    }
    pod = _pod(container, None, labels | {"app.kubernetes.io/component": "worker"})
    pod["spec"]["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]  # the python backend's tensors
    return {"name": f"TritonWorker{index}", "type": "worker", "replicas": 1, "podTemplate": pod}


def graph(llms: list[LLM], *, name: str, triton_models: list[tuple[str, int]], triton_image: str,
          disaggregated: bool, storage_uri: str) -> list[dict]:
    """The DynamoGraphDeployment (and, for TensorRT-LLM, the ConfigMap of its engine arguments)."""
    engine = one_engine(llms, "dynamo") if llms else "triton"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "triton-builder"}
    docs: list[dict] = []
    if engine == "triton":
        if disaggregated:
            raise UserError("--disaggregated: prefill/decode disaggregation needs Dynamo's vLLM or TensorRT-LLM "
                            f"worker; {', '.join(m.name for m in llms) or 'this repository'} is served by Triton "
                            "itself (build a format: vllm or tensorrt-llm variant)")
        components = [_frontend(triton_image, engine, labels)]
        components += [_triton_worker(model, triton_image, gpus, labels, i) for i, (model, gpus) in
                       enumerate(triton_models)]
        spec = {"components": components}
    else:
        if len(llms) > 1:
            raise UserError(f"--target dynamo: one LLM per graph; the repository has {len(llms)} "
                            f"({', '.join(m.name for m in llms)}); deploy one repository per model")
        m = llms[0]
        image = RUNTIME_IMAGES[engine]
        roles = ["prefill", "decode"] if disaggregated else [None]
        components = [_frontend(image, engine, labels)]
        components += [_worker(m, image, role, labels, storage_uri, name) for role in roles]
        spec = {"backendFramework": engine, "components": components}
        if engine == "trtllm":
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-engine", "labels": labels},
                         "data": {f"{role or 'agg'}.yaml": _yaml(trtllm_engine_config(m, role)) for role in roles}})
    docs.insert(0, {"apiVersion": "nvidia.com/v1beta1", "kind": "DynamoGraphDeployment",
                    "metadata": {"name": name, "labels": labels}, "spec": spec})
    return docs


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
