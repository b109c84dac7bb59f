"""`triton-builder validate`: re-check a repository on disk, as Triton and a reviewer would."""

from __future__ import annotations

from pathlib import Path

from builder.errors import RunError, UserError
from builder.render import parse_config

LEFTOVERS = ("${", "{{", "{%")


def validate_repository(repo: Path) -> int:
    """Raise UserError listing every problem; return the number of models checked."""
    repo = Path(repo)
    if not repo.is_dir():
        raise UserError(f"{repo}: not a directory; build one with 'triton-builder build SPEC -o {repo}'")
    problems: list[str] = []
    configs = {}
    model_dirs = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not model_dirs:
        raise UserError(f"{repo}: holds no models; build one with 'triton-builder build SPEC -o {repo}'")
    targets = llm_targets(repo)  # TensorRT-LLM / vLLM models: their own checks (builder/targets)
    for d in model_dirs:
        if d.name in targets:
            problems += targets[d.name]()
            continue
        cfg_path = d / "config.pbtxt"
        if not cfg_path.is_file():
            problems.append(f"{d.name}: no config.pbtxt")
            continue
        text = cfg_path.read_text()
        for token in LEFTOVERS:
            if token in text:
                problems.append(f"{d.name}/config.pbtxt: unfilled template text {token!r}")
        try:
            cfg = parse_config(text, f"{d.name}/config.pbtxt")
        except RunError as exc:
            problems.append(str(exc))
            continue
        if cfg.name and cfg.name != d.name:
            problems.append(f"{d.name}/config.pbtxt: name {cfg.name!r} differs from its directory {d.name!r}")
        configs[d.name] = cfg
        problems += check_artifacts(d, cfg)
        problems += check_perf_input(d, cfg)
    configs.update({name: None for name in targets})
    manifest_path = repo / "triton-builder.json"
    if manifest_path.is_file():
        from builder.manifest import read_manifest

        for name, entry in read_manifest(repo)["models"].items():
            if name not in configs and (repo / name).exists() is False:
                problems.append(f"{name}: listed in triton-builder.json but missing on disk")
            for f in entry.get("files", []):
                path = repo / name / f["path"]
                if not path.is_file():
                    problems.append(f"{name}: file {f['path']} listed in triton-builder.json is missing")
                elif f["path"].split("/")[0].isdigit() and "sha256" in f and changed(path, f):
                    problems.append(f"{name}: file {f['path']} differs from the one built (size or sha256 in "
                                    "triton-builder.json); rebuild the repository")
    if any(c is not None and c.platform == "ensemble" for c in configs.values()):
        from builder.ensembles import check_ensembles

        problems += check_ensembles(repo, configs)
    if problems:
        raise UserError(f"{repo}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return len(configs)


def llm_targets(repo: Path) -> dict:
    """{model name: a check returning problems} for the manifest's rendered TensorRT-LLM / vLLM models. Their
    runtime files (TensorRT-LLM's model.py, an engine) come from the serving image or its build step."""
    from builder.manifest import MANIFEST, read_manifest

    if not (repo / MANIFEST).is_file():
        return {}
    from builder.targets import TARGETS

    def checker(name: str, entry: dict):
        def run() -> list[str]:
            options = {"runtime_files": False} if entry["target"] == "tensorrt-llm" else {}
            try:
                TARGETS[entry["target"]].check(repo / name, entry, **options)
            except UserError as exc:
                return [str(exc)]
            return []

        return run

    models = read_manifest(repo)["models"].items()
    return {n: (lambda: []) if e.get("role") == "llm-part" else checker(n, e)  # parts: checked with their ensemble
            for n, e in models if e.get("target") in TARGETS}


def changed(path: Path, record: dict) -> bool:
    """Whether a model's file (weights, code) is no longer the one the build recorded: a damaged or
    replaced artifact is caught here, before a server spends its start-up on it."""
    from builder.cache import sha256_file

    return path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]


def check_artifacts(model_dir: Path, cfg) -> list[str]:
    if cfg.platform == "ensemble":
        return []
    problems = []
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        return [f"{model_dir.name}: no version directory (e.g. {model_dir.name}/1/)"]
    from builder import formats

    native = formats.for_backend(cfg.backend, cfg.platform)
    for v in versions:
        if native is not None:  # served by its own Triton backend: the file it loads, checked by its format
            filename = cfg.default_model_filename or native.native.get("default_model_filename")
            if filename and not (v / filename).is_file():
                problems.append(f"{model_dir.name}/{v.name}: {filename} is missing")
            else:  # a format whose backend reads a folder (an LLM engine set) checks the version folder
                problems += native.check(v / filename if filename else v, cfg, model_dir.name)
            continue
        if cfg.backend == "python":
            if not (v / "model.py").is_file():
                problems.append(f"{model_dir.name}/{v.name}: python backend needs model.py")
            artifact = params.get("artifact")
            if artifact and not (v / artifact).is_file():
                problems.append(f"{model_dir.name}/{v.name}: artifact {artifact} (parameters.artifact) is missing")
            fmt = formats.for_artifact(artifact) if artifact else None
            if fmt is not None and (v / artifact).is_file():
                problems += fmt.check(v / artifact, cfg, model_dir.name)
    for w in cfg.model_warmup:
        for key, inp in w.inputs.items():
            if inp.input_data_file and not (model_dir / "warmup" / inp.input_data_file).is_file():
                problems.append(f"{model_dir.name}: warmup file warmup/{inp.input_data_file} for {key} is missing")
    return problems


def check_perf_input(model_dir: Path, cfg) -> list[str]:
    """<model>/perf_input.json, where the build wrote one: perf_analyzer input data naming exactly the
    config's inputs in every request."""
    import json

    from builder.perf.inputs import PERF_INPUT

    path = model_dir / PERF_INPUT
    if not path.is_file():
        return []
    where = f"{model_dir.name}/{PERF_INPUT}"
    try:
        data = json.loads(path.read_text())["data"]
        if not isinstance(data, list) or not data or not all(isinstance(e, dict) for e in data):
            raise ValueError("'data' must be a non-empty list of requests")
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{where}: not perf_analyzer input data ({exc}); rebuild the repository or delete the file"]
    names = sorted(i.name for i in cfg.input)
    bad = [k for k, entry in enumerate(data) if sorted(entry) != names]
    if bad:
        return [f"{where}: request {bad[0]} names {sorted(data[bad[0]])}, the config's inputs are {names}; "
                "rebuild the repository or delete the file"]
    return []
