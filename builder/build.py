"""`triton-builder build`: spec -> verified variants -> a Triton model repository + triton-builder.json."""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from builder import __version__, convert, verify
from builder.errors import BuilderError, RunError, UserError, root_reason, step, unexpected
from builder.families import Part, parts_for, sample_batches
from builder.manifest import MANIFEST, SCHEMA, save_reference, write_manifest
from builder.render import input_limits, model_config, warmup_files
from builder.repository import checkpoint, clean_stale, deferred_signals, file_records, install, locked, staging
from builder.signature import Signature, TensorSpec
from builder.spec import Model, Spec, Variant, load_spec

RUNNER = Path(__file__).resolve().parent.parent / "templates" / "python" / "runner.py"
TOOLS = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy", "tritonclient")
VERIFY_SAMPLES = 4
CALIBRATION_SAMPLES = 8


@dataclass
class VariantResult:
    triton_name: str
    model: str
    variant: str
    status: str  # passed | failed | error
    seconds: float
    bytes: int = 0
    worst_cosine: float | None = None
    worst_abs: float | None = None
    message: str = ""
    step: str = ""  # export | verify: where an error or failure happened
    cached: bool = False  # reused from the build cache

    def describe(self) -> str:
        """One line naming the model, the variant, the step and the reason."""
        if self.variant == "*":
            return f"models[{self.model}]: {self.message}"
        reason = "; ".join(line.strip().removeprefix("- ") for line in self.message.splitlines() if line.strip())
        if self.status == "failed":
            reason = f"out of tolerance: {reason}"
        return f"models[{self.model}].variants[{self.variant}]: {self.step or 'build'}: {reason}"


@dataclass
class BuildResult:
    out: Path
    results: list[VariantResult] = field(default_factory=list)

    @property
    def failed(self) -> list[VariantResult]:
        return [r for r in self.results if r.status != "passed"]


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    versions["triton-builder"] = __version__
    return versions


def build(spec_path: Path, out: Path, *, runtime: str | None = None, only: list[str] | None = None,
          keep_failed: bool = False, keep_going: bool = False, cache: bool = True,
          console: Console | None = None) -> BuildResult:
    from builder.cache import open_cache

    console = console or Console(stderr=True)
    spec = load_spec(spec_path)
    runtime = runtime or spec.runtime
    models = spec.models
    if only:
        unknown = sorted(set(only) - {m.name for m in models})
        if unknown:
            raise UserError(f"--model {unknown[0]}: not in {spec_path}; known: {', '.join(m.name for m in models)}")
        models = [m for m in models if m.name in only]
    for m in models:
        for v in m.variants:
            if v.format == "tensorrt":
                from builder.convert import onnx2trt

                if runtime != "native":
                    raise UserError(f"{spec_path}: models[{m.name}].variants[{v.tag}]: format tensorrt is served by "
                                    "Triton's tensorrt backend; set runtime: native (or --runtime native)")
                onnx2trt.check_available(f"{spec_path}: models[{m.name}].variants[{v.tag}]")
    if not any(m.source.hf for m in models):
        from builder.sources import offline_env

        offline_env()
    out = Path(out).resolve()
    result = BuildResult(out)
    store = open_cache(cache)
    with locked(out), staging(out) as stage:
        from builder.manifest import read_manifest

        clean_stale(out, keep=stage)  # left by a build that was killed (SIGKILL, power loss)

        previous = read_manifest(out)["models"] if (out / MANIFEST).is_file() else {}
        manifest = {"schema": SCHEMA, "builder_version": __version__, "runtime": runtime,
                    "spec": str(Path(spec_path).resolve()), "tool_versions": tool_versions(), "models": dict(previous)}
        for model in models:
            checkpoint()
            t0 = time.time()
            console.print(f"[bold]{model.name}[/] ({model.task})")
            try:
                if model.generation is not None:
                    entries = build_generator(spec, Path(spec_path), model, stage, result, console)
                else:
                    entries = build_model(spec, Path(spec_path), model, runtime, stage, result, keep_failed, console,
                                          store, manifest["tool_versions"])
            except Exception as exc:  # noqa: BLE001 - unexpected ones too: one line, the model counts as failed
                if not isinstance(exc, BuilderError):
                    exc = RunError(f"build: {unexpected(exc, f'models[{model.name}] build')}")
                if not keep_going:
                    raise type(exc)(f"models[{model.name}]: {exc}") from exc
                result.results.append(VariantResult(model.name, model.name, "*", "error", time.time() - t0, message=str(exc)))
                console.print(f"  [red]error[/] {escape(str(exc))}")
                continue
            checkpoint()  # a Ctrl-C / SIGTERM whose exception a library swallowed stops us here
            failures = [r for r in result.results if r.model == model.name and r.status != "passed"]
            if failures and not (keep_going or keep_failed):
                console.print(f"  [red]{model.name}: not installed[/]; {escape(str(out))} keeps what it had "
                              "(--keep-going installs the variants that passed)")
                break
            with deferred_signals():  # a model lands whole, with its manifest entries, or not at all
                for name, entry in entries.items():
                    install(stage / name, out)
                    manifest["models"][name] = entry
                write_manifest(out, manifest)
            if failures and not keep_going:
                break
    print_summary(result, console)
    return result


def build_model(spec: Spec, spec_path: Path, model: Model, runtime: str, stage: Path, result: BuildResult,
                keep_failed: bool, console: Console, store=None, tools: dict | None = None) -> dict[str, dict]:
    from builder.sources import load_source

    entries: dict[str, dict] = {}
    keys, hits = {}, set()
    if store is not None:
        from builder.cache import variant_keys

        keys = variant_keys(spec, spec_path, model, runtime, tools or tool_versions())
        for variant in model.variants:
            hit = store.fetch(keys[variant.tag], stage)
            if hit is not None:
                hits.add(variant.tag)
                for name, entry in hit.models.items():
                    entries[name] = entry
                    result.results.append(cached_result(name, model.name, variant.tag, entry))
                    console.print(f"  {name}: cached")
        if len(hits) == len(model.variants) and model.ensemble is None:
            return entries
    console.print(f"  loading {model.source.kind} source")
    where = f"models[{model.name}]"
    with step("load", where):
        loaded = load_source(spec_path, model)
        tokenizer = load_tokenizer(loaded.files_dir)
        parts = parts_for(model.task, loaded, model)
    serving = spec.serving(model)
    built: dict[str, dict[str, tuple[Path, dict]]] = {}  # variant tag -> what the cache gets
    for index, part in enumerate(parts):
        stem = f"{model.name}_{part.suffix}" if part.suffix else model.name
        with step("reference", where):
            part = with_batch_dim(part, serving["max_batch_size"])
            samples = sample_batches(part, tokenizer, VERIFY_SAMPLES, seed=1000 + index,
                                     typical_len=model.shapes.sequence_length)
            names = [t.name for t in part.inputs]
            references = [verify.torch_reference(part.module, names, s, part.outputs) for s in samples]
            sig = Signature(part.inputs, output_specs(part, references, serving["max_batch_size"]),
                            serving["max_batch_size"], dict(part.extra))
        example = example_args(part)
        work = stage / "_work" / stem
        fp32_onnx = work / "model.onnx"
        for variant in model.variants:
            checkpoint()
            if variant.tag in hits:
                continue
            name = f"{stem}_{variant.tag}"
            t0 = time.time()
            console.print(f"  {name}: exporting")
            doing = "export"
            try:
                artifact, command = make_artifact(variant, part, example, fp32_onnx, stage / name / "1",
                                                  lambda: sample_batches(part, tokenizer, CALIBRATION_SAMPLES, 7, model.shapes.sequence_length),
                                                  spec_path, model, serving["max_batch_size"])
                console.print(f"  {name}: verifying against fp32 PyTorch on {len(samples)} batches")
                doing = "verify"
                check = check_variant(variant, artifact, part, samples, references, serving["instances"].kind)
            except Exception as exc:  # noqa: BLE001 - one variant's failure, unexpected ones too, is a result
                if not isinstance(exc, RunError):
                    exc = unexpected(exc, f"{where}.variants[{variant.tag}] {doing}")
                shutil.rmtree(stage / name, ignore_errors=True)
                built[variant.tag] = None
                result.results.append(VariantResult(name, model.name, variant.tag, "error", time.time() - t0,
                                                    message=str(exc), step=doing))
                console.print(f"  [red]{name}: {escape(str(exc))}[/]")
                continue
            worst_cos = min(o["cosine"] for o in check["outputs"].values())
            worst_abs = max(o["max_abs"] for o in check["outputs"].values())
            status = "passed" if check["passed"] else "failed"
            lines = verify.failure_lines(check)
            vr = VariantResult(name, model.name, variant.tag, status, time.time() - t0, 0, worst_cos, worst_abs,
                               "\n".join(lines), step="verify")
            result.results.append(vr)
            if status == "failed":
                built[variant.tag] = None
                console.print(f"  [red]{name}: verification failed[/]\n    " + escape("\n    ".join(lines)))
                if not keep_failed:
                    shutil.rmtree(stage / name, ignore_errors=True)
                    continue
            model_dir = stage / name
            with step("config", f"{where}.variants[{variant.tag}]"):
                save_reference(model_dir / "reference.npz", samples[0], references[0])
                write_config(model_dir, name, sig, runtime, variant, artifact, serving, model)
            files = file_records(model_dir)
            vr.bytes = sum(f["bytes"] for f in files if f["path"].startswith("1/") and not f["path"].endswith(".py"))
            entries[name] = {
                "role": "variant", "model": model.name, "part": part.suffix, "task": model.task,
                "format": variant.format, "precision": variant.precision, "calibration": variant.calibration,
                "status": status, "source": loaded.description, "signature": sig.to_dict(), "files": files,
                "verification": check, "reference": "reference.npz", "command": command,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 2),
            }
            if (model_dir / "1" / "model.plan.json").is_file():  # TensorRT version + GPU the engine needs
                entries[name]["tensorrt"] = json.loads((model_dir / "1" / "model.plan.json").read_text())
            if built.get(variant.tag, {}) is not None:
                built.setdefault(variant.tag, {})[name] = (model_dir, entries[name])
    if store is not None:
        store_variants(store, keys, built, console)
    if model.ensemble is not None:
        from builder.ensembles import build_ensembles

        with step("ensemble", where):
            ensembles = build_ensembles(model, loaded, tokenizer, entries, stage, runtime, serving, console)
        for name, entry in ensembles.items():
            if entry["role"] == "ensemble":
                worst = entry["verification"].get("outputs", {}).values()
                result.results.append(VariantResult(
                    name, model.name, entry["variant"], entry["status"], entry["seconds"],
                    worst_cosine=min((o["cosine"] for o in worst if "cosine" in o), default=None),
                    worst_abs=max((o["max_abs"] for o in worst if "max_abs" in o), default=None),
                    message=entry["verification"].get("reason", ""), step="ensemble"))
            if entry["status"] == "failed" and not keep_failed:
                shutil.rmtree(stage / name, ignore_errors=True)
                continue
            entries[name] = entry
    return entries


def build_generator(spec: Spec, spec_path: Path, model: Model, stage: Path, result: BuildResult,
                    console: Console) -> dict[str, dict]:
    """A text-generation model with a generation: block (builder/generation): its variants and results."""
    from builder.generation import build_generation

    entries, outcomes = build_generation(spec, spec_path, model, stage, console)
    for o in outcomes:
        name = o.get("name", f"{model.name}_{o['variant']}")
        size = sum(f["bytes"] for f in entries[name]["files"] if f["path"].startswith("1/")) if name in entries else 0
        result.results.append(VariantResult(name, model.name, o["variant"], o["status"], o.get("seconds", 0.0), size,
                                            o.get("cosine"), None, o["message"], step=o["step"]))
    return entries


def cached_result(name: str, model: str, tag: str, entry: dict) -> VariantResult:
    outputs = entry["verification"]["outputs"].values()
    size = sum(f["bytes"] for f in entry["files"] if f["path"].startswith("1/") and not f["path"].endswith(".py"))
    return VariantResult(name, model, tag, "passed", 0.0, size, min(o["cosine"] for o in outputs),
                         max(o["max_abs"] for o in outputs), cached=True)


def store_variants(store, keys: dict[str, str], built: dict, console: Console) -> None:
    """Put the variants that passed in the cache; a cache that cannot be written only costs a warning."""
    for tag, models in built.items():
        if models:
            try:
                store.store(keys[tag], tag, models)
            except OSError as exc:
                console.print(f"  [yellow]cache: could not store {tag} in {escape(str(store.root))}: {escape(str(exc))}[/]")


def make_artifact(variant: Variant, part: Part, example: tuple, fp32_onnx: Path, version_dir: Path,
                  calibration, spec_path: Path, model: Model, max_batch_size: int = 0) -> tuple[Path, str]:
    from builder.convert import torch2exported, torch2onnx

    rebuild = shlex.join(["triton-builder", "build", str(spec_path), "--model", model.name])
    version_dir.mkdir(parents=True, exist_ok=True)
    if variant.format == "torch":
        dst = version_dir / "model.pt2"
        torch2exported.export(part, example, dst, variant.precision)
        return dst, rebuild
    if not fp32_onnx.exists():
        torch2onnx.export(part, example, fp32_onnx)
    dst = version_dir / "model.onnx"
    if variant.format == "tensorrt":
        from builder.convert import onnx2trt

        shapes = onnx2trt.profile_shapes(part.inputs, max_batch_size, part.batch_in_dims)
        record = onnx2trt.build_engine(fp32_onnx, version_dir / "model.plan", variant.precision, shapes)
        return version_dir / "model.plan", shlex.join(record["command"])
    if variant.precision == "fp32":
        for f in fp32_onnx.parent.glob("model.onnx*"):
            shutil.copy2(f, version_dir / f.name)
        return dst, rebuild
    module = convert.ONNX_PRECISIONS[variant.precision]
    import importlib

    conv = importlib.import_module(module)
    try:
        if variant.precision == "int8":
            conv.convert(fp32_onnx, dst, variant.calibration, calibration() if variant.calibration == "static" else None)
        else:
            conv.convert(fp32_onnx, dst)
    except Exception as exc:
        raise RunError(f"{module.rsplit('.', 1)[1]} failed: {root_reason(exc)}") from exc
    if variant.calibration == "static":  # its calibration inputs come from the spec's model: rebuild through it
        return dst, rebuild
    extra = ["--calibration", "dynamic"] if variant.precision == "int8" else []
    return dst, f"{rebuild}  # fp32 export, then: {convert.command(module, fp32_onnx.name, dst.name, *extra)}"


def check_variant(variant: Variant, artifact: Path, part: Part, samples, references, device: str = "cpu") -> dict:
    tol = variant.effective_tolerance
    names = [t.name for t in part.inputs]
    try:
        if variant.format == "torch":
            run = verify.TorchRunner(artifact, names, list(part.outputs), variant.precision, device)
        elif variant.format == "tensorrt":
            from builder.convert import onnx2trt

            run = lambda feeds: onnx2trt.run_engine(artifact, feeds)  # noqa: E731 - trtexec, where it built
        else:
            run = verify.OnnxRunner(artifact)
        checks = []
        for feeds, ref in zip(samples, references):
            got = run(feeds)
            mask = feeds.get("attention_mask")
            checks.append([verify.compare(n, got[n], ref[n], tol, mask) for n in part.outputs])
    except Exception as exc:
        raise RunError(f"running the artifact failed: {root_reason(exc)}") from exc
    return verify.summarize(checks, tol)


def write_config(model_dir: Path, name: str, sig: Signature, runtime: str, variant: Variant, artifact: Path,
                 serving: dict, model: Model) -> None:
    native = runtime == "native" and variant.format in ("onnx", "tensorrt")
    parameters = {}
    if not native:
        shutil.copy2(RUNNER, model_dir / "1" / "model.py")
        parameters = {"runner": "torch" if variant.format == "torch" else "onnx", "artifact": artifact.name,
                      "precision": variant.precision, "device": serving["instances"].kind,
                      "threads": str(serving["instances"].threads)}
        if variant.format == "torch":
            parameters.update(torch_parameters(variant, sig, serving, model))
        parameters["input_limits"] = input_limits(sig)  # the runner refuses requests outside them
    warmup = warmup_files(sig, 1, model_dir) if serving["warmup"] else []
    text = model_config(name, sig, runtime=runtime, fmt=variant.format, serving=serving, parameters=parameters,
                        warmup=warmup)
    (model_dir / "config.pbtxt").write_text(text)


def torch_parameters(variant: Variant, sig: Signature, serving: dict, model: Model) -> dict:
    """Runner settings of a torch variant: which tensors carry the sequence axis, graph buckets, compile."""
    from builder.families import TOKEN_KINDS

    seq_inputs = [t.name for t in sig.inputs if t.kind in TOKEN_KINDS]
    seq_outputs = [t.name for t in sig.outputs if seq_inputs and sig.max_batch_size > 0 and t.dims[:1] == (-1,)]
    params = {"seq_inputs": ",".join(seq_inputs), "seq_outputs": ",".join(seq_outputs), "compile": variant.compile,
              "cuda_graphs": "1" if variant.cuda_graphs else "0"}
    if variant.cuda_graphs:
        mbs = max(sig.max_batch_size, 1)
        db = serving["dynamic_batching"]
        buckets = {1, mbs} | {2 ** i for i in range(12) if 2 ** i < mbs} | set(db.preferred_batch_sizes if db else [])
        params["batch_buckets"] = ",".join(str(b) for b in sorted(buckets))
        params["seq_buckets"] = ",".join(str(b) for b in model.shapes.buckets()) if seq_inputs else ""
        params["example_shapes"] = json.dumps({t.name: [list(t.dims), t.dtype] for t in sig.inputs})
    return params


def with_batch_dim(part: Part, max_batch_size: int) -> Part:
    """With max_batch_size 0 the batch axis is an ordinary dynamic dim of every tensor."""
    if max_batch_size > 0:
        return part
    inputs = tuple(replace(t, dims=(-1, *t.dims), opt_dims=(1, *t.example_shape()),
                           max_dims=(-1, *t.max_dims) if t.max_dims else None) for t in part.inputs)
    return replace(part, inputs=inputs, batch_in_dims=True)


def example_args(part: Part) -> tuple:
    """Example tensors for export: batch 2 and a typical length, so no axis is specialized to 0/1."""
    import torch

    arrays = part.arrays(2, np.random.default_rng(3))
    return tuple(torch.from_numpy(arrays[t.name]) for t in part.inputs)


def output_specs(part: Part, references: list[dict], max_batch_size: int) -> tuple[TensorSpec, ...]:
    """Output dims from reference outputs of differently shaped samples: dims that vary are dynamic."""
    specs = []
    for name in part.outputs:
        shapes = {r[name].shape for r in references}
        ranks = {len(s) for s in shapes}
        if len(ranks) != 1:
            raise RunError(f"output {name} changes rank between inputs: {sorted(shapes)}")
        dims = tuple(-1 if len({s[i] for s in shapes}) > 1 else next(iter(shapes))[i] for i in range(ranks.pop()))
        dtype = {str(r[name].dtype) for r in references}.pop()  # integer outputs (argmax, ids) stay integers
        specs.append(TensorSpec(name, dtype, dims[1:] if max_batch_size > 0 else (-1, *dims[1:])))
    return tuple(specs)


def load_tokenizer(files_dir: Path | None):
    if files_dir is None or not any((files_dir / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(files_dir), local_files_only=True)
    except (OSError, ValueError):
        return None


def print_summary(result: BuildResult, console: Console) -> None:
    table = Table(title=f"build -> {result.out}")
    table.add_column("triton model", no_wrap=True)
    for col in ("status", "size", "cosine", "max|diff|", "time"):
        table.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
    for r in result.results:
        colour = {"passed": "green", "failed": "red", "error": "red"}[r.status]
        table.add_row(r.triton_name, f"[{colour}]{r.status}[/]" + (" (cached)" if r.cached else ""), f"{r.bytes / 1e6:.1f} MB" if r.bytes else "-",
                      f"{r.worst_cosine:.6f}" if r.worst_cosine is not None else "-",
                      f"{r.worst_abs:.2e}" if r.worst_abs is not None else "-", f"{r.seconds:.1f}s")
    console.print(table)
