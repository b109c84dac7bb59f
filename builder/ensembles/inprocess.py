"""The ensemble's computation without Triton: the python models' own code and files, the variants'
artifacts, wired as the ensemble is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from builder.ensembles.plan import Plan, Step, StepModel, python_model
from builder.errors import RunError
from builder.signature import Signature


def run_in_process(plan: Plan, steps: list[Step], variants: list[tuple[str, Signature]], stage: Path,
                   inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The ensemble's computation without Triton: the python models' functions and the variants' artifacts."""
    runners = {m.name: step_function(stage / m.name, m) for m in (plan.pre, plan.post)}
    for name, sig in variants:
        runners[name] = artifact_function(stage / name, sig)
    tensors = {k: as_object(v) for k, v in inputs.items()}
    for step in steps:
        outs = runners[step.model]({k: tensors[v] for k, v in step.inputs.items()})
        tensors.update({v: outs[k] for k, v in step.outputs.items()})
    got = {t.name: tensors[t.name] for t in plan.outputs}
    return got, tensors


def as_object(array: np.ndarray) -> np.ndarray:
    """'S' arrays as Triton hands BYTES to python models: object arrays of bytes."""
    if array.dtype.kind != "S":
        return array
    out = np.empty(array.shape, dtype=np.object_)
    out.reshape(-1)[:] = [bytes(x) for x in array.reshape(-1).tolist()]
    return out


def step_function(model_dir: Path, m: StepModel):
    """One staged pre/post model's computation, from its own files, as its model.py runs it for one request."""
    module = python_model(m.template)
    version = model_dir / "1"
    if m.template == "preprocess.py":
        settings = None
        if "image_processor" in m.parameters:
            settings = json.loads((version / m.parameters["image_processor"]).read_text())
        tokenizer = version / m.parameters["tokenizer"] if "tokenizer" in m.parameters else None
        pre = module.Preprocessor(json.loads(m.parameters["inputs"]), json.loads(m.parameters["kinds"]), tokenizer,
                                  settings)
        return lambda feeds: pre([pre.decode(feeds)])[0]
    labels = json.loads((version / m.parameters["labels"]).read_text(encoding="utf-8")) if "labels" in m.parameters else None
    post = module.PostProcessor(m.parameters, labels)
    tensors = json.loads(m.parameters["tensors"])
    in_roles, out_roles = module.ROLES[m.parameters["task"]]

    def run(feeds):
        answer = post({role: feeds[tensors[role]] for role in in_roles})
        return {tensors[role]: answer[role] for role in out_roles}

    return run


def artifact_function(model_dir: Path, sig: Signature):
    """A staged variant's artifact as a function, run by its format's in-process runner."""
    from builder import formats
    from builder.render import parse_config

    cfg = parse_config((model_dir / "config.pbtxt").read_text(), f"{model_dir.name}/config.pbtxt")
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    fmt = formats.for_backend(cfg.backend, cfg.platform)
    artifact = fmt.native["default_model_filename"] if fmt else params.get("artifact", "")
    fmt = fmt or formats.for_artifact(artifact)
    if fmt is None or fmt.runner is None or not fmt.in_process or not (model_dir / "1" / artifact).is_file():
        raise RunError(f"{model_dir.name}: no artifact that runs here ({artifact or 'none'}) for the ensemble's "
                       "check in-process")
    runner = fmt.runner(model_dir / "1" / artifact, sig, params.get("precision", "fp32"), "cpu")
    names = [t.name for t in sig.inputs]
    return lambda feeds: runner({n: feeds[n] for n in names})
