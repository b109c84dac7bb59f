"""`triton-builder build`: spec -> verified variants -> a Triton model repository + triton-builder.json."""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from builder import __version__, formats, verify, versions
from builder.errors import BuilderError, RunError, UserError, root_reason, step, unexpected
from builder.families import Part, parts_for, sample_batches
from builder.manifest import MANIFEST, SCHEMA, signature_of, write_manifest
from builder.paths import PYTHON_MODELS
from builder.render import input_limits, model_config, warmup_files
from builder.repository import checkpoint, clean_stale, deferred_signals, file_records, install, locked, staging
from builder.signature import Signature, TensorSpec
from builder.spec import Model, Spec, Variant, load_spec

RUNNER = PYTHON_MODELS / "runner.py"
BACKEND_COMMON = PYTHON_MODELS / "backend_common.py"  # what runner.py imports, beside it
TOOLS = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy", "tritonclient")
VERIFY_SAMPLES = 4
CALIBRATION_SAMPLES = 32


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
    return versions.tool_versions(TOOLS)


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
    for m in models:  # refused before any work: a format that cannot be built or served here
        for v in m.variants:
            formats.get(v.format, endpoint(m)).preflight(f"{spec_path}: models[{m.name}].variants[{v.tag}]", runtime)
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
        ctx = Build(spec, Path(spec_path), runtime, stage, result, keep_failed, console, store, manifest["tool_versions"])
        for model in models:
            checkpoint()
            t0 = time.time()
            console.print(f"[bold]{model.name}[/] ({model.task})")
            try:
                entries = build_model(ctx, model)
            except Exception as exc:  # noqa: BLE001 - unexpected ones too: one line, the model counts as failed
                if not isinstance(exc, BuilderError):
                    exc = RunError(f"build: {unexpected(exc, f'models[{model.name}] build')}")
                if not keep_going:
                    if str(exc).startswith(f"models[{model.name}]"):  # it names its field already
                        raise exc
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
            write_perf_inputs(stage, entries, console)
            with deferred_signals():  # a model lands whole, with its manifest entries, or not at all
                for name, entry in entries.items():
                    install(stage / name, out)
                    manifest["models"][name] = entry
                write_manifest(out, manifest)
            if failures and not keep_going:
                break
    print_summary(result, console)
    return result


@dataclass
class Build:
    """What every model of one build shares."""

    spec: Spec
    spec_path: Path
    runtime: str
    stage: Path  # models are staged here, then installed one by one
    result: BuildResult
    keep_failed: bool
    console: Console
    store: object | None = None  # the build cache (builder.cache.BuildCache), None with --no-cache
    tools: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One variant of one part of a model: the record that flows through export, verification, config
    and manifest (each format's module reads it; see builder.formats)."""

    ctx: Build
    model: Model
    variant: Variant
    part: Part
    stem: str  # the part's Triton name prefix: {model} or {model}_{part}
    sig: Signature
    serving: dict
    samples: tuple  # verification inputs
    references: tuple  # the fp32 PyTorch outputs on them
    example: tuple  # export example tensors
    source: str  # where the model came from, in words
    calibration: Callable = lambda: []  # static int8: calibration batches, made on demand
    served_as: str = ""  # the Triton name where it is not {stem}_{tag} (a generation model's first variant)

    @property
    def name(self) -> str:
        return self.served_as or f"{self.stem}_{self.variant.tag}"

    @property
    def fmt(self) -> formats.Format:
        return formats.get(self.variant.format, endpoint(self.model))

    @property
    def model_dir(self) -> Path:
        return self.ctx.stage / self.name

    @property
    def version_dir(self) -> Path:
        return self.model_dir / "1"

    @property
    def fp32_onnx(self) -> Path:
        return self.ctx.stage / "_work" / self.stem / "model.onnx"

    @property
    def runtime(self) -> str:
        return self.ctx.runtime

    @property
    def spec_path(self) -> Path:
        return self.ctx.spec_path

    @property
    def rebuild(self) -> str:
        return shlex.join(["triton-builder", "build", str(self.ctx.spec_path), "--model", self.model.name])


def endpoint(model: Model) -> str:
    """What `model` is served as: the generation endpoint, or a stateless tensor model."""
    return "generation" if model.generation is not None else "tensors"


def served_names(model: Model) -> dict[str, str]:
    """variant tag -> Triton name where it is not {model}_{tag}: a generation model's first variant of our
    own endpoint is served under the model's name."""
    if model.generation is None:
        return {}
    ours = [v.tag for v in model.variants if formats.get(v.format, "generation").build is None]
    return {ours[0]: model.name} if ours else {}


@dataclass(frozen=True)
class Prepared:
    """What the variants of one part are built and verified from."""

    part: object  # builder.families.Part, or builder.generation.Prepared
    stem: str
    sig: Signature
    samples: tuple
    references: tuple
    example: tuple = ()
    calibration: Callable = lambda: []


def build_model(ctx: Build, model: Model) -> dict[str, dict]:
    """Build every variant of `model` into ctx.stage; return the manifest entries of what to install."""
    console, result = ctx.console, ctx.result
    entries: dict[str, dict] = {}
    keys, hits = {}, set()
    names = served_names(model)
    if ctx.store is not None:
        from builder.cache import variant_keys

        keys = variant_keys(ctx.spec, ctx.spec_path, model, ctx.runtime, ctx.tools or tool_versions(), names)
        for variant in model.variants:
            hit = ctx.store.fetch(keys[variant.tag], ctx.stage)
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
    serving = ctx.spec.serving(model)
    loaded = tokenizer = None
    if model.generation is not None:
        from builder import generation

        with step("load", where):
            ready = generation.prepare(ctx.spec_path, model, console)
        model = model.model_copy(update={"generation": ready.generation})  # unset limits fitted to the model
        prepared = [Prepared(ready, model.name, generation.signature(), tuple(ids for _, _, ids in ready.prompts),
                             ready.ref_tokens)]
        description = ready.source.description
    else:
        from builder.sources import load_source

        with step("load", where):
            loaded = load_source(ctx.spec_path, model)
            tokenizer = load_tokenizer(loaded.files_dir)
            parts = parts_for(model.task, loaded, model)
        prepared = [prepare_part(model, part, tokenizer, serving, index, where) for index, part in enumerate(parts)]
        description = loaded.description
    built: dict[str, dict[str, tuple[Path, dict]]] = {}  # variant tag -> what the cache gets
    for ready in prepared:
        for variant in model.variants:
            checkpoint()
            if variant.tag in hits:
                continue
            job = Job(ctx, model, variant, ready.part, ready.stem, ready.sig, serving, ready.samples, ready.references,
                      ready.example, description, ready.calibration, names.get(variant.tag, ""))
            made = build_target(job) if job.fmt.build is not None else {job.name: build_variant(job)}
            for name, entry in made.items():
                if entry is not None:
                    entries[name] = entry
                if entry is None or entry["status"] not in ("passed", "rendered"):
                    built[variant.tag] = None
                elif built.get(variant.tag, {}) is not None:
                    built.setdefault(variant.tag, {})[name] = (ctx.stage / name, entry)
    if ctx.store is not None:
        store_variants(ctx.store, keys, built, console)
    if model.ensemble is not None:
        from builder.ensembles import build_ensembles

        with step("ensemble", where):
            ensembles = build_ensembles(model, loaded, tokenizer, entries, ctx.stage, ctx.runtime, serving, console)
        for name, entry in ensembles.items():
            if entry["role"] == "ensemble":
                worst = entry["verification"].get("outputs", {}).values()
                result.results.append(VariantResult(
                    name, model.name, entry["variant"], entry["status"], entry["seconds"],
                    worst_cosine=min((o["cosine"] for o in worst if "cosine" in o), default=None),
                    worst_abs=max((o["max_abs"] for o in worst if "max_abs" in o), default=None),
                    message=entry["verification"].get("reason", ""), step="ensemble"))
            if entry["status"] == "failed" and not ctx.keep_failed:
                shutil.rmtree(ctx.stage / name, ignore_errors=True)
                continue
            entries[name] = entry
    return entries


def prepare_part(model: Model, part: Part, tokenizer, serving: dict, index: int, where: str) -> Prepared:
    """A family's part with its verification samples, fp32 references, signature and export example."""
    with step("reference", where):
        part = with_batch_dim(part, serving["max_batch_size"])
        samples = sample_batches(part, tokenizer, VERIFY_SAMPLES, seed=1000 + index,
                                 typical_len=model.shapes.sequence_length)
        names = [t.name for t in part.inputs]
        references = [verify.torch_reference(part.module, names, s, part.outputs) for s in samples]
        sig = Signature(part.inputs, output_specs(part, references, serving["max_batch_size"]),
                        serving["max_batch_size"], dict(part.extra))
        example = example_args(part)
    return Prepared(part, f"{model.name}_{part.suffix}" if part.suffix else model.name, sig, tuple(samples),
                    tuple(references), example,
                    lambda: sample_batches(part, tokenizer, CALIBRATION_SAMPLES, 7, model.shapes.sequence_length))


def build_target(job: Job) -> dict[str, dict]:
    """A format that writes its own model set (an LLM backend's, render-only): its entries and results."""
    console, t0 = job.ctx.console, time.time()
    console.print(f"  {job.name}: rendering")
    try:
        made = job.fmt.build(job)
    except Exception as exc:  # noqa: BLE001 - one variant's failure, unexpected ones too, is a result
        if not isinstance(exc, BuilderError):
            exc = unexpected(exc, f"models[{job.model.name}].variants[{job.variant.tag}] render")
        shutil.rmtree(job.model_dir, ignore_errors=True)
        job.ctx.result.results.append(VariantResult(job.name, job.model.name, job.variant.tag, "error",
                                                    time.time() - t0, message=str(exc), step="render"))
        console.print(f"  [red]{job.name}: {escape(str(exc))}[/]")
        return {job.name: None}
    for name, entry in made.items():
        size = sum(f["bytes"] for f in entry.get("files", []) if f["path"].startswith("1/"))
        job.ctx.result.results.append(VariantResult(name, job.model.name, job.variant.tag, "passed", time.time() - t0,
                                                    size, message="rendered, not executed here", step="render"))
    return made


def build_variant(job: Job) -> dict | None:
    """Export, verify, render and describe one variant; its result goes to job.ctx.result. Returns its
    manifest entry, or None when nothing of it is to be installed."""
    console, name = job.ctx.console, job.name
    t0 = time.time()
    console.print(f"  {name}: exporting")
    doing = "export"
    try:
        job.version_dir.mkdir(parents=True, exist_ok=True)
        artifact, command = make_artifact(job)
        doing = "verify"
        check = check_variant(job, artifact)
    except Exception as exc:  # noqa: BLE001 - one variant's failure, unexpected ones too, is a result
        if not isinstance(exc, RunError):
            exc = unexpected(exc, f"models[{job.model.name}].variants[{job.variant.tag}] {doing}")
        shutil.rmtree(job.model_dir, ignore_errors=True)
        job.ctx.result.results.append(VariantResult(name, job.model.name, job.variant.tag, "error", time.time() - t0,
                                                    message=str(exc), step=doing))
        console.print(f"  [red]{name}: {escape(str(exc))}[/]")
        return None
    numbers = [o for o in check["outputs"].values() if o.get("cosine") is not None]
    status = "passed" if check["passed"] else "failed"
    lines = verify.failure_lines(check) + list(check.get("problems", ()))
    vr = VariantResult(name, job.model.name, job.variant.tag, status, time.time() - t0, 0,
                       min((o["cosine"] for o in numbers), default=None),
                       max((o["max_abs"] for o in numbers), default=None), "\n".join(lines), step="verify")
    job.ctx.result.results.append(vr)
    if status == "failed":
        console.print(f"  [red]{name}: verification failed[/]\n    " + escape("\n    ".join(lines)))
        if not job.ctx.keep_failed:
            shutil.rmtree(job.model_dir, ignore_errors=True)
            return None
    with step("config", f"models[{job.model.name}].variants[{job.variant.tag}]"):
        reference = job.fmt.reference(job, artifact, check)
        write_config(job, artifact)
    files = file_records(job.model_dir)
    vr.bytes = sum(f["bytes"] for f in files if f["path"].startswith("1/") and not f["path"].endswith(".py"))
    return {
        "role": "variant", "model": job.model.name, "part": job.part.suffix, "task": job.model.task,
        "format": job.variant.format, "precision": job.variant.precision, "calibration": job.variant.calibration,
        "status": status, "source": job.source, "signature": job.sig.to_dict(), "files": files,
        "verification": {k: v for k, v in check.items() if k != "problems"}, "reference": reference,
        "command": command,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 2),
        **job.fmt.record(job, artifact),
    }


def cached_result(name: str, model: str, tag: str, entry: dict) -> VariantResult:
    outputs = (entry.get("verification") or {}).get("outputs", {}).values()
    size = sum(f["bytes"] for f in entry["files"] if f["path"].startswith("1/") and not f["path"].endswith(".py"))
    return VariantResult(name, model, tag, "passed", 0.0, size,
                         min((o["cosine"] for o in outputs if o.get("cosine") is not None), default=None),
                         max((o["max_abs"] for o in outputs if o.get("max_abs") is not None), default=None), cached=True)


def store_variants(store, keys: dict[str, str], built: dict, console: Console) -> None:
    """Put the variants that passed in the cache; a cache that cannot be written only costs a warning."""
    for tag, models in built.items():
        if models:
            try:
                store.store(keys[tag], tag, models)
            except OSError as exc:
                console.print(f"  [yellow]cache: could not store {tag} in {escape(str(store.root))}: {escape(str(exc))}[/]")


def make_artifact(job: Job) -> tuple[Path, str]:
    """The variant's artifact under job.version_dir, and the command that reproduces it (its format's
    conversion)."""
    return job.fmt.export(job)


def check_variant(job: Job, artifact: Path) -> dict:
    """Every output of the artifact against the fp32 PyTorch references, on every sample."""
    if job.fmt.verify is not None:  # a verification of its own (the generation endpoint's)
        return job.fmt.verify(job, artifact)
    tol = job.variant.effective_tolerance
    if job.fmt.runner is None:  # a render-only target: nothing here can run it
        return {"passed": True, "verified": False, "tolerance": tol.model_dump(), "samples": 0, "outputs": {}}
    console = job.ctx.console
    console.print(f"  {job.name}: verifying against fp32 PyTorch on {len(job.samples)} batches")
    try:
        run = job.fmt.runner(artifact, job.sig, job.variant.precision, job.serving["instances"].kind)
        checks = []
        for feeds, ref in zip(job.samples, job.references):
            got = run(feeds)
            mask = feeds.get("attention_mask")
            checks.append([verify.compare(n, got[n], ref[n], tol, mask) for n in job.part.outputs])
    except Exception as exc:
        raise RunError(f"running the artifact failed: {root_reason(exc)}") from exc
    return verify.summarize(checks, tol)


def write_config(job: Job, artifact: Path) -> None:
    """config.pbtxt (and the python-backend runner with its parameters, where the format is served by it)."""
    fmt, serving = job.fmt, job.serving
    if fmt.render(job, artifact):  # a format with its own config and files
        return
    backend = fmt.backend(job.runtime)
    parameters = {}
    if backend["backend"] == "python":
        shutil.copy2(RUNNER, job.version_dir / "model.py")
        shutil.copy2(BACKEND_COMMON, job.version_dir / BACKEND_COMMON.name)
        parameters = {"runner": fmt.python_runner, "artifact": artifact.name, "precision": job.variant.precision,
                      "device": serving["instances"].kind, "threads": str(serving["instances"].threads),
                      **fmt.parameters(job, artifact)}
        parameters["input_limits"] = input_limits(job.sig)  # the runner refuses requests outside them
    warmup = warmup_files(job.sig, 1, job.model_dir) if serving["warmup"] else []
    text = model_config(job.name, job.sig, backend=backend, serving=serving, parameters=parameters, warmup=warmup)
    (job.model_dir / "config.pbtxt").write_text(text)


def write_perf_inputs(stage: Path, entries: dict[str, dict], console: Console) -> None:
    """<model>/perf_input.json for every servable model: perf_analyzer --input-data requests made from the
    signature as `perf` makes them (token inputs from the model's ensemble tokenizer where it has one),
    for any load tool (Model Analyzer, perf_analyzer by hand). Listed in the entry's files."""
    from builder.perf.inputs import PERF_INPUT, ensemble_tokenizer, write_input_data

    for name, entry in entries.items():
        if entry.get("status") != "passed" or "signature" not in entry or "generation" in entry \
                or entry.get("target") or not (stage / name / "config.pbtxt").is_file():
            continue
        try:
            write_input_data(signature_of(entry), stage / name / PERF_INPUT,
                             tokenizer=ensemble_tokenizer(stage, entry))
        except UserError as exc:  # a signature make_inputs cannot fill: perf says the same when it runs
            console.print(f"  [yellow]{name}: no {PERF_INPUT}: {escape(str(exc))}[/]")
            continue
        record = next(r for r in file_records(stage / name) if r["path"] == PERF_INPUT)
        entry["files"] = [f for f in entry.get("files", []) if f["path"] != PERF_INPUT] + [record]


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
        tokenizer = AutoTokenizer.from_pretrained(str(files_dir), local_files_only=True)
    except (OSError, ValueError):
        return None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # causal LMs often have none; samples pad
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
