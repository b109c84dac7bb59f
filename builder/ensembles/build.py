"""Staging `{name}_pre`, `{name}_post` and the ensembles of a model, checked in-process before they are
returned."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from builder.ensembles.inprocess import run_in_process
from builder.ensembles.plan import PARTS, PYTHON_MODELS, Step, StepModel, make_plan, variant_name, wire
from builder.ensembles.references import compare_answers, pre_check, reference_inputs, torch_expected
from builder.ensembles.wiring import check_staged
from builder.errors import RunError, UserError, root_reason
from builder.manifest import save_reference, signature_of
from builder.render import PYTHON_BACKEND, model_config, render_template
from builder.repository import file_records
from builder.signature import Signature


STEP_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # pre/post models: same code, same inputs


def build_ensembles(model, loaded, tokenizer, entries: dict[str, dict], stage: Path, runtime: str, serving: dict,
                    console) -> dict[str, dict]:
    """Stage `{name}_pre`, `{name}_post` and the ensembles of `model` under `stage/`; return their entries.

    `entries` are the model's variants just built (staged under stage/<name>/). Ensembles whose
    variant did not pass are skipped with a message (the build fails on that variant already);
    an ensemble whose end-to-end numbers miss the tolerance is returned with status "failed".
    """
    t0 = time.time()
    if loaded.config is None:
        raise UserError(f"models[{model.name}].ensemble: needs a Hugging Face model (its tokenizer or image "
                        f"processor files); a factory source has none")
    parts = PARTS.get(model.task, ("",))
    wanted = ensembles_to_build(model, parts, entries, console)
    if not wanted:
        return {}
    console.print(f"  {model.name}: pre/post-processing and {len(wanted)} ensemble(s), checked end to end")
    variant_sigs = {tag: [(variant_name(model.name, p, tag), signature_of(entries[variant_name(model.name, p, tag)]))
                          for p in parts] for tag in dict.fromkeys(wanted.values())}
    plan = make_plan(model, loaded, tokenizer, dict(zip(parts, (s for _, s in next(iter(variant_sigs.values()))))))
    for m in (plan.pre, plan.post):
        write_step_model(stage / m.name, m, runtime, serving)
    inputs = reference_inputs(plan)
    try:
        expected = torch_expected(model, loaded, tokenizer, plan, inputs)
        runs = {}
        for tag, variants in variant_sigs.items():
            steps = wire(plan, variants)
            runs[tag] = (steps, *run_in_process(plan, steps, variants, stage, inputs))
        tensors = next(iter(runs.values()))[2]  # the first ensemble's intermediate tensors: pre/post references
        pre_numbers = pre_check(plan, tokenizer, tensors, inputs)
    except (UserError, RunError):
        raise
    except Exception as exc:
        raise RunError(f"checking the ensemble in-process failed: {root_reason(exc)}") from exc

    common = {"model": model.name, "task": model.task, "source": loaded.description, "built_at": now(),
              "command": next(e["command"] for e in entries.values() if e.get("command")).split("  #")[0]}
    out: dict[str, dict] = {}
    for m, numbers in ((plan.pre, pre_numbers), (plan.post, {"passed": True})):
        save_text_safe(stage / m.name / "reference.npz", {t.name: tensors[t.name] for t in m.sig.inputs},
                       {t.name: tensors[t.name] for t in m.sig.outputs})
        out[m.name] = {"role": m.role, **common, "status": "passed" if numbers["passed"] else "failed",
                       "signature": m.sig.to_dict(), "files": file_records(stage / m.name),
                       "verification": {"tolerance": dict(STEP_TOLERANCE), **numbers}, "reference": "reference.npz",
                       "seconds": round(time.time() - t0, 2)}
    sig = Signature(plan.inputs, plan.outputs, plan.max_batch_size)
    variants_by_tag = {v.tag: v for v in model.variants}
    for name, tag in wanted.items():
        steps, got, _ = runs[tag]
        variant = variants_by_tag[tag]
        verification = compare_answers(got, expected, variant)
        if not pre_numbers["passed"]:
            verification["passed"] = False
            verification["reason"] = "; ".join(r for r in (pre_numbers["reason"], verification["reason"]) if r)
        write_ensemble(stage / name, name, sig, steps)
        save_text_safe(stage / name / "reference.npz", inputs, expected)
        status = "passed" if verification["passed"] else "failed"
        if status == "failed":
            console.print(f"  [red]{name}: end-to-end verification failed: {verification['reason']}[/]")
        out[name] = {"role": "ensemble", **common, "variant": tag, "format": variant.format,
                     "precision": variant.precision, "status": status, "signature": sig.to_dict(),
                     "steps": [s.model for s in steps], "files": file_records(stage / name),
                     "verification": verification, "reference": "reference.npz",
                     "seconds": round(time.time() - t0, 2)}
    problems = check_staged(stage, [*entries, *out])
    if problems:
        raise RunError(f"{model.name}: the ensembles it built are wired wrongly (a triton-builder bug):\n  "
                       + "\n  ".join(problems))
    return out


def ensembles_to_build(model, parts: tuple[str, ...], entries: dict[str, dict], console) -> dict[str, str]:
    """Ensemble name -> variant tag: `{name}` for ensemble.variant (default: the first variant that
    passed) and, with per_variant, `{name}_{tag}_ensemble` for every variant that passed."""
    from builder import formats

    tags = [v.tag for v in model.variants if formats.get(v.format).in_process]  # e.g. an engine cannot run here
    passed = [t for t in tags
              if all(entries.get(variant_name(model.name, p, t), {}).get("status") == "passed" for p in parts)]
    default = model.ensemble.variant or (passed[0] if passed else None)
    wanted: dict[str, str] = {}
    if default in passed:
        wanted[model.name] = default
    else:
        console.print(f"  [red]{model.name}: no ensemble {model.name}: variant {default or '(none)'} did not pass[/]")
    if model.ensemble.per_variant:
        wanted.update({f"{model.name}_{t}_ensemble": t for t in passed})
    return wanted


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_step_model(model_dir: Path, m: StepModel, runtime: str, serving: dict) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PYTHON_MODELS / m.template, version / "model.py")
    shutil.copy2(PYTHON_MODELS / "backend_common.py", version / "backend_common.py")  # what model.py imports
    for name, text in m.files.items():
        (version / name).write_text(text, encoding="utf-8")
    cpu = {**serving, "instances": serving["instances"].model_copy(update={"kind": "cpu"})}
    text = model_config(m.name, m.sig, backend=PYTHON_BACKEND, serving=cpu, parameters=m.parameters, warmup=[])
    (model_dir / "config.pbtxt").write_text(text)


def write_ensemble(model_dir: Path, name: str, sig: Signature, steps: list[Step]) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version directory, even empty
    text = render_template("ensemble.pbtxt.j2", f"{name}/config.pbtxt", name=name, max_batch_size=sig.max_batch_size,
                           inputs=sig.inputs, outputs=sig.outputs,
                           steps=[{"model": s.model, "inputs": s.inputs, "outputs": s.outputs} for s in steps])
    (model_dir / "config.pbtxt").write_text(text)


def save_text_safe(path: Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """save_reference with bytes as fixed-width 'S' arrays; refuses items 'S' would change (trailing NULs)."""
    def fixed(array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if array.dtype.kind not in "OSU":
            return array
        items = [x.encode() if isinstance(x, str) else bytes(x) for x in array.reshape(-1).tolist()]
        if any(item.endswith(b"\0") for item in items):
            raise RunError(f"{path}: an item ends with a NUL byte, which fixed-width bytes arrays drop")
        return np.array(items, dtype=np.bytes_).reshape(array.shape)

    save_reference(path, {k: fixed(v) for k, v in inputs.items()}, {k: fixed(v) for k, v in outputs.items()})
