"""`profile --try`: check a suggestion instead of guessing. Apply the top advice's spec change to a
copy of the spec (the build manifest records the spec's path), rebuild that model with only the
variant concerned into a temporary repository, measure the original and the changed variant with
`perf` under the same settings, one after the other, and compare them (builder.perf.compare).

OUT/try/ keeps spec.yaml (the changed copy), before/ and after/ (perf results) and compare.md.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

from builder.diagnose.advice import Advice, variant_tag
from builder.errors import UserError

TRIABLE = ("instances.count", "instances.threads", "dynamic_batching.preferred_batch_sizes", "cuda_graphs", "calibration")


def changed_spec(spec_path: Path, advice: Advice) -> dict:
    """The spec as data with the advice's change applied and the model reduced to the variant concerned."""
    from builder.spec import Variant, load_spec

    change = advice.change
    spec = load_spec(spec_path)
    data = yaml.safe_load(Path(spec_path).read_text())
    index = next((i for i, m in enumerate(spec.models) if m.name == change.model), None)
    if index is None:
        raise UserError(f"{spec_path}: no model {change.model!r} in the spec the repository was built from")
    model, raw = spec.models[index], data["models"][index]
    serving = spec.serving(model)
    tag = change.variant_tag or advice.evidence.get("variant_tag")
    keep = [v for v in raw["variants"] if Variant.model_validate(v).tag == tag]
    if not keep:
        raise UserError(f"{spec_path}: models[{model.name}] has no variant {tag!r}")
    if change.field in ("instances.count", "instances.threads"):
        raw["instances"] = {**serving["instances"].model_dump(), change.field.split(".")[1]: change.value}
    elif change.field == "dynamic_batching.preferred_batch_sizes":
        raw["dynamic_batching"] = {**serving["dynamic_batching"].model_dump(), "preferred_batch_sizes": change.value}
    elif change.field in ("cuda_graphs", "calibration"):
        keep = [{**keep[0], change.field: change.value}]
    else:
        raise UserError(f"--try: {change.describe()} cannot be tried automatically; apply it to the spec by hand")
    raw["variants"] = keep
    raw.pop("ensemble", None)
    if model.source.path is not None:  # the copy lives elsewhere: local sources become absolute
        raw["source"] = {**raw["source"], "path": str((Path(spec_path).parent / model.source.path).resolve())}
    return {**data, "models": [raw]}


def try_advice(repo: Path, manifest: dict, tips: list[Advice], out: Path, *, concurrency=(1, 4),
               measurement_ms: int = 2000, server_options: dict | None = None, console=None) -> tuple[Advice, Path, int]:
    """Try the first advice with a triable change; returns (advice, compare.md, regressions found).
    `server_options`: passed to builder.runtime.start_server (tritonserver, stub_python, gpus) for
    both measurements, e.g. on the GPU machine."""
    from builder.build import build
    from builder.perf.compare import write_comparison
    from builder.perf.run import run_perf

    tip = next((t for t in tips if t.change is not None and t.change.field in TRIABLE), None)
    if tip is None:
        raise UserError("--try: no advice with a spec change that can be tried here "
                        f"({', '.join(TRIABLE)}); see the advice in the report")
    spec_path = manifest.get("spec")
    if not spec_path or not Path(spec_path).is_file():
        raise UserError(f"{repo}: the spec it was built from ({spec_path}) is not there; --try rebuilds from it")
    entry = manifest["models"][tip.variant]
    tip.evidence.setdefault("variant_tag", variant_tag(tip.variant, entry))
    work = Path(out) / "try"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    spec_copy = work / "spec.yaml"
    spec_copy.write_text(yaml.safe_dump(changed_spec(Path(spec_path), tip), sort_keys=False))
    if console:
        from rich.markup import escape

        console.print(escape(f"trying {tip.rule} on {tip.variant}: {tip.change.describe()} (spec copy {spec_copy})"))
    with tempfile.TemporaryDirectory(prefix="triton-builder-try-") as tmp:
        new_repo = Path(tmp) / "repo"
        result = build(spec_copy, new_repo, console=console)
        if result.failed:
            raise UserError(f"--try: the changed spec did not build: {result.failed[0].describe()}")
        from builder.manifest import read_manifest

        built = read_manifest(new_repo)["models"]
        after_name = next(n for n, e in built.items() if e.get("role", "variant") == "variant")
        from builder.runtime import start_server

        for which, where, name in (("before", repo, tip.variant), ("after", new_repo, after_name)):
            with start_server(where, **(server_options or {})) as server:
                run_perf(where, server=server, models=[name], concurrency=concurrency, measurement_ms=measurement_ms,
                         out=work / which, console=console)
    comparison, path = write_comparison(work / "before", work / "after", out=work,
                                        rename_new={after_name: tip.variant} if after_name != tip.variant else None)
    path.write_text(f"Tried: **{tip.rule}** on {tip.variant}: {tip.message}. Spec change `{tip.change.describe()}` "
                    f"(rebuilt as {after_name}). {outcome(comparison)}\n\n" + path.read_text())
    return tip, path, len(comparison.regressions)


def outcome(comparison) -> str:
    """One sentence on what the measured before/after says about the suggestion."""
    table = comparison.table
    if table.empty:
        return "Outcome: nothing measured in both runs."
    best = table.loc[table["throughput_change_pct"].idxmax()]
    at = f"{best['throughput_change_pct']:+.1f} % throughput at concurrency {best['concurrency']} (band ±{best['throughput_noise_pct']:.0f} %)"
    if (table["verdict"] == "regressed").any():
        return f"Outcome: **worse**: a regression beyond the noise; best level {at}. Do not apply it."
    if (table["verdict"] == "improved").any():
        return f"Outcome: **confirmed**: {at}."
    if abs(best["throughput_change_pct"]) > comparison.threshold_pct:
        return (f"Outcome: **not confirmed**: best level {at}: above the {comparison.threshold_pct:g} % threshold but within "
                "the noise band of these two runs; measure again with `perf --repeats` and a tighter `--stability-pct` "
                "on a quieter machine.")
    return f"Outcome: **no gain**: no level changed beyond the {comparison.threshold_pct:g} % threshold; best level {at}."
