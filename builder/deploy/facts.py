"""What a built repository needs to run elsewhere, read from its manifest and its config.pbtxt files:
the Triton image, the pinned Python packages of its python-backend models, GPUs, decoupled models.

Nothing is re-derived from the spec: the configs are the truth the server will load.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from builder.deploy import ngc
from builder.errors import UserError
from builder.manifest import read_manifest

# module-level imports of a model.py -> the package that provides them
IMPORTS = {"numpy": "numpy", "torch": "torch", "tokenizers": "tokenizers", "safetensors": "safetensors",
           "PIL": "pillow", "onnxruntime": "onnxruntime"}
# image flavour of a Triton backend (builder.deploy.ngc.FLAVOURS); backends not listed are in the plain -py3 image
FLAVOURS = {"vllm": "vllm", "tensorrtllm": "trtllm"}
TARGET_BACKENDS = {"vllm": "vllm", "tensorrt-llm": "tensorrtllm"}  # manifest target -> the backend it is served by


@dataclass(frozen=True)
class ModelFacts:
    name: str
    backend: str  # python, onnxruntime, tensorrt, ensemble, vllm, tensorrtllm, ...
    gpu: bool  # any instance group on KIND_GPU
    gpus: int  # GPUs one replica needs for it: listed gpus, else 1 when gpu
    decoupled: bool
    packages: tuple[str, ...]  # what its python code imports (python backend only)
    task: str | None
    role: str | None


@dataclass(frozen=True)
class RepoFacts:
    repo: Path
    models: tuple[ModelFacts, ...]
    image: str  # base image, nvcr.io/nvidia/tritonserver:<tag>-<flavour>
    requirements: tuple[str, ...]  # pinned pip requirements for the image's Python, e.g. ("numpy==2.4.6", ...)
    python: str  # the image's Python (major.minor)

    @property
    def gpu(self) -> bool:
        return any(m.gpu for m in self.models)

    @property
    def gpus(self) -> int:
        return max((m.gpus for m in self.models), default=0)

    @property
    def decoupled(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models if m.decoupled)

    @property
    def tag(self) -> str:
        return self.image.rsplit(":", 1)[1]


def read_facts(repo: Path, base_image: str) -> RepoFacts:
    from builder.render import parse_config

    repo = Path(repo)
    manifest = read_manifest(repo)
    entries = manifest.get("models", {})
    models = []
    for path in sorted(repo.glob("*/config.pbtxt")):
        name = path.parent.name
        config = parse_config(path.read_text(), str(path))
        models.append(_model(path.parent, name, config, entries.get(name, {})))
    if not models:
        raise UserError(f"{repo}: no model directories with a config.pbtxt; build the repository first")
    # TensorRT-LLM's llmapi model is a python model: the manifest's target names the image it needs
    targets = {TARGET_BACKENDS[e["target"]] for e in entries.values() if e.get("target") in TARGET_BACKENDS}
    image = _image(repo, base_image, entries, {m.backend for m in models} | targets)
    return RepoFacts(repo=repo, models=tuple(models), image=image, requirements=_requirements(models, ngc.pins(image)),
                     python=ngc.release_of(image).python)


def _model(folder: Path, name: str, config, entry: dict) -> ModelFacts:
    backend = "ensemble" if config.platform == "ensemble" else (config.backend or config.platform)
    groups = [g for g in config.instance_group if g.kind == g.KIND_GPU]
    gpu = bool(groups) or _parameters(config).get("device") == "gpu"
    gpus = max((len(g.gpus) or 1 for g in groups), default=1 if gpu else 0)
    decoupled = config.model_transaction_policy.decoupled
    packages: set[str] = set()
    if backend == "python" and not entry.get("target"):  # an LLM target's python models come with its image
        params = _parameters(config)
        packages.add("numpy")
        packages |= {"torch": {"torch"}, "onnx": {"onnxruntime"}}.get(params.get("runner", ""), set())
        if "tokenizer" in params:
            packages.add("tokenizers")
        if "image_processor" in params:
            packages.add("pillow")
        if decoupled:  # a generation model: weights in safetensors, a torch decoder, a tokenizer
            packages |= {"torch", "tokenizers", "safetensors"}
        for code in folder.glob("[0-9]*/*.py"):
            packages |= _imports(code)
    return ModelFacts(name=name, backend=backend, gpu=gpu, gpus=gpus, decoupled=decoupled,
                      packages=tuple(sorted(packages)), task=entry.get("task"), role=entry.get("role"))


def _parameters(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def _imports(path: Path) -> set[str]:
    """Packages a python model imports at module level (lazy imports inside functions are the runner's
    alternatives, e.g. onnxruntime or torch, and are decided by its parameters instead)."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except SyntaxError as exc:
        raise UserError(f"{path}: not valid Python (line {exc.lineno}); rebuild the repository") from None
    found = set()
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        found |= {IMPORTS[n.split(".")[0]] for n in names if n.split(".")[0] in IMPORTS}
    return found


def _requirements(models: list[ModelFacts], pins: dict[str, str]) -> tuple[str, ...]:
    wanted = set().union(*(m.packages for m in models))
    if "onnxruntime" in wanted and any(m.gpu and "onnxruntime" in m.packages for m in models):
        wanted = (wanted - {"onnxruntime"}) | {"onnxruntime-gpu"}  # it has the CPU provider too; never both
    return tuple(f"{p}=={pins[p]}" for p in sorted(wanted))


def _image(repo: Path, base: str, entries: dict, backends: set[str]) -> str:
    """The base image: the one TensorRT engines were built in (they only run with that TensorRT), else
    `base`; with the flavour a vLLM or TensorRT-LLM backend needs."""
    built = {e["tensorrt"]["image"] for e in entries.values() if (e.get("tensorrt") or {}).get("image")}
    if len(built) > 1:
        raise UserError(f"{repo}: TensorRT engines were built in different images ({', '.join(sorted(built))}); "
                        "rebuild them in one image")
    if built:
        base = built.pop()
    match = re.fullmatch(r"(.+):(\d\d\.\d\d)-[\w-]*py3", base)
    if not match:
        raise UserError(f"--base-image {base!r}: give an NGC Triton image such as {ngc.DEFAULT_IMAGE}")
    if match.group(2) not in ngc.RELEASES:
        raise UserError(f"--base-image {base!r}: tag {match.group(2)} is not in the NGC release table "
                        f"(builder/deploy/ngc.py: {min(ngc.RELEASES)} to {max(ngc.RELEASES)}); choose one of those")
    flavours = {FLAVOURS[b] for b in backends if b in FLAVOURS}
    if len(flavours) > 1:
        raise UserError(f"{repo}: models need both the vLLM and the TensorRT-LLM image; deploy them as two repositories")
    if flavours:
        return f"{match.group(1)}:{match.group(2)}{ngc.FLAVOURS[flavours.pop()]}"
    return base
