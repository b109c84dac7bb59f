"""Advice: rules that turn measurements into the next step, each citing the number that triggered it
and the spec change to make.

Inputs: the in-process profiles (builder.diagnose.profile), the build manifest (verification
numbers), and optionally a perf results table (the served breakdown: queue, compute input / infer
/ output, server CPU and GPU use). A rule returns None when its condition does not hold.

A `Change` is data: which model and variant of the spec, and the fields to set. `profile --try`
applies the first applicable one to a copy of the spec (builder.diagnose.trial).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import pandas as pd

from builder import cpu, formats

# Thresholds: each is cited in the advice text when it fires.
LAUNCH_BUSY_RATIO = 0.6  # GPU kernels busy below this share of the wall time per forward
SMALL_BATCH = 4  # "small batch": the launch-bound rule looks at batches up to this
QUEUE_SHARE = 0.5  # queue time above this share of the server's time per request
COMPUTE_INPUT_SHARE = 0.3  # compute input above this share of the server's compute time
QUANT_SPEEDUP = 1.2  # an int8 variant this much faster than fp32 at the same level
GPU_UTIL_BAR = 80.0  # the product's bar at the operating point
SERVER_PARTS = ("server_queue_ms", "server_compute_input_ms", "server_compute_infer_ms", "server_compute_output_ms")


@dataclass(frozen=True)
class Change:
    """A spec edit: models[model].<field> (or models[model].variants[tag].<field>) = value."""

    model: str
    variant_tag: str | None  # None: a model-level field
    field: str  # dotted: "instances.count", "cuda_graphs", "dynamic_batching.preferred_batch_sizes", ...
    value: object

    def describe(self) -> str:
        where = f"models[{self.model}]" + (f".variants[{self.variant_tag}]" if self.variant_tag else "")
        return f"{where}.{self.field}: {self.value!r}"


@dataclass
class Advice:
    rule: str
    variant: str
    message: str  # the next step, with the number that triggered it
    evidence: dict = field(default_factory=dict)
    change: Change | None = None
    weight: float = 0.0  # how much it matters (bigger first); comparable within one report

    def to_dict(self) -> dict:
        out = asdict(self)
        out["change"] = self.change.describe() if self.change else None
        return out


def variant_tag(name: str, entry: dict) -> str:
    """The spec's variant tag (format_precision[_static...]) from the Triton model name."""
    model, part = entry.get("model", ""), entry.get("part") or ""
    stem = f"{model}_{part}" if part else model
    return name[len(stem) + 1:] if name.startswith(stem + "_") else f"{entry.get('format')}_{entry.get('precision')}"


def _server_ms(row) -> float:
    return float(sum(row[c] for c in SERVER_PARTS if pd.notna(row.get(c))))


def _measured(table: pd.DataFrame | None, variant: str) -> pd.DataFrame:
    if table is None or table.empty:
        return pd.DataFrame()
    rows = table[(table["variant"] == variant) & table["throughput"].notna()]
    return rows.sort_values("concurrency")


# --------------------------------------------------------------------------- the rules

def launch_bound(p, entry, rows) -> Advice | None:
    """GPU torch variant whose kernels are busy less than LAUNCH_BUSY_RATIO of a small-batch forward."""
    if p.device != "cuda" or "cuda_graphs" not in formats.get(p.format).options \
            or p.config.get("params", {}).get("cuda_graphs") == "1":
        return None
    small = [r for r in p.runs if r.batch <= SMALL_BATCH and r.busy_ratio is not None]
    run = min(small, key=lambda r: r.busy_ratio, default=None)
    if run is None or run.busy_ratio >= LAUNCH_BUSY_RATIO:
        return None
    tag = variant_tag(p.variant, entry)
    return Advice("launch-bound", p.variant,
                  f"launch-bound at batch {run.batch}: kernels busy {run.kernel_busy_ms:.2f} ms of "
                  f"{run.ms_per_forward:.2f} ms per forward ({run.busy_ratio:.0%} < {LAUNCH_BUSY_RATIO:.0%}); "
                  "replay CUDA graphs: set cuda_graphs: true on this variant",
                  {"batch": run.batch, "kernel_busy_ms": run.kernel_busy_ms, "ms_per_forward": run.ms_per_forward},
                  Change(p.model, tag, "cuda_graphs", True), weight=1 - run.busy_ratio)


def queue_dominates(p, entry, rows) -> Advice | None:
    """At the highest measured concurrency, queue time is more than QUEUE_SHARE of the server's time."""
    if rows.empty:
        return None
    top = rows.iloc[-1]
    total = _server_ms(top)
    queue = float(top.get("server_queue_ms") or 0)
    if total <= 0 or queue / total <= QUEUE_SHARE or int(top["concurrency"]) < 2:
        return None
    count = p.instances
    cores = os.cpu_count() or 1
    evidence = {"concurrency": int(top["concurrency"]), "queue_ms": queue, "server_ms": total, "instances": count}
    head = (f"queue {queue:.2f} ms of {total:.2f} ms server time per request ({queue / total:.0%} > {QUEUE_SHARE:.0%}) "
            f"at concurrency {int(top['concurrency'])}")
    if p.device == "cuda" or count * max(p.threads, 1) < cores:
        return Advice("queue-dominates", p.variant, f"{head}: requests wait for the {count} instance(s); "
                      f"raise instances.count to {count + 1}",
                      evidence, Change(p.model, None, "instances.count", count + 1), weight=queue / total)
    sizes = p.config.get("preferred_batch_sizes") or []
    mbs = p.config.get("max_batch_size") or 0
    larger = sorted({*sizes, mbs}) if mbs else sizes
    return Advice("queue-dominates", p.variant, f"{head}: the {count} instance(s) already use the {cores} core(s); "
                  f"let the batcher form larger batches: preferred_batch_sizes {larger}",
                  evidence, Change(p.model, None, "dynamic_batching.preferred_batch_sizes", larger) if larger != sizes else None,
                  weight=queue / total)


def compute_input_dominates(p, entry, rows) -> Advice | None:
    """Compute input (moving the request's tensors into the model) above COMPUTE_INPUT_SHARE of compute."""
    if rows.empty:
        return None
    worst = None
    for _, r in rows.iterrows():
        compute = sum(float(r.get(c) or 0) for c in SERVER_PARTS[1:])
        if compute > 0:
            share = float(r.get("server_compute_input_ms") or 0) / compute
            if worst is None or share > worst[0]:
                worst = (share, r, compute)
    if worst is None or worst[0] <= COMPUTE_INPUT_SHARE:
        return None
    share, r, compute = worst
    sig_inputs = entry.get("signature", {}).get("inputs", [])
    wide = [t["name"] for t in sig_inputs if t.get("dtype") in ("int64", "float64", "float32")]
    return Advice("compute-input-dominates", p.variant,
                  f"compute input {float(r['server_compute_input_ms']):.2f} ms of {compute:.2f} ms compute per request "
                  f"({share:.0%} > {COMPUTE_INPUT_SHARE:.0%}) at concurrency {int(r['concurrency'])}: send less data: "
                  f"a smaller input dtype ({', '.join(wide) or 'the inputs'}) or an ensemble that takes the encoded "
                  "data (raw text / image bytes) and prepares it inside the server",
                  {"concurrency": int(r["concurrency"]), "compute_input_ms": float(r["server_compute_input_ms"]),
                   "compute_ms": compute},
                  Change(p.model, None, "ensemble", {"variant": variant_tag(p.variant, entry)}), weight=share)


def quantization_wins(p, entry, rows, *, table=None, manifest=None, accuracy_budget=None) -> Advice | None:
    """On the CPU, an int8 variant of the same model is QUANT_SPEEDUP faster than this fp32 one at the
    same level, and its accuracy meets the budget (default: its verification passed)."""
    if p.device != "cpu" or p.precision != "fp32" or rows.empty or table is None:
        return None
    models = manifest.get("models", {})
    best = None
    for name, other in models.items():
        if other.get("model") != p.model or other.get("precision") != "int8" or other.get("status") != "passed":
            continue
        cosines = [o.get("cosine") for o in (other.get("verification") or {}).get("outputs", {}).values()]
        cosine = min((c for c in cosines if isinstance(c, (int, float))), default=None)
        if accuracy_budget is not None and (cosine is None or cosine < accuracy_budget):
            continue
        theirs = _measured(table, name).set_index("concurrency")["throughput"]
        for _, r in rows.iterrows():
            c = int(r["concurrency"])
            if c in theirs.index and r["throughput"] > 0:
                ratio = float(theirs[c]) / float(r["throughput"])
                if best is None or ratio > best[0]:
                    best = (ratio, name, c, float(r["throughput"]), float(theirs[c]), cosine)
    if best is None or best[0] < QUANT_SPEEDUP:
        return None
    ratio, name, c, mine, theirs, cosine = best
    budget = f"within the {accuracy_budget:g} cosine budget" if accuracy_budget is not None else "passed verification"
    return Advice("quantization-wins", p.variant,
                  f"{name} serves {theirs:.1f} infer/s against {mine:.1f} here at concurrency {c} "
                  f"({ratio:.2f}× ≥ {QUANT_SPEEDUP:g}×) and its worst cosine {cosine:.6f} {budget}: serve the int8 "
                  "variant (point the ensemble at it)",
                  {"int8_variant": name, "concurrency": c, "speedup": ratio, "cosine": cosine},
                  Change(p.model, None, "ensemble.variant", variant_tag(name, models[name])), weight=ratio - 1)


def low_gpu_utilization(p, entry, rows) -> Advice | None:
    """GPU utilization below GPU_UTIL_BAR at the operating point (the highest stable throughput)."""
    if rows.empty or "gpu_util_pct" not in rows or rows["gpu_util_pct"].isna().all():
        return None
    stable = rows[rows["stable"]] if "stable" in rows else rows
    if stable.empty:
        return None
    top = stable.loc[stable["throughput"].idxmax()]
    util = top.get("gpu_util_pct")
    if util is None or math.isnan(util) or util >= GPU_UTIL_BAR:
        return None
    return Advice("low-gpu-utilization", p.variant,
                  f"GPU utilization {util:.0f} % < {GPU_UTIL_BAR:g} % at the operating point (concurrency "
                  f"{int(top['concurrency'])}, {top['throughput']:.1f} infer/s): the GPU waits for work; add an "
                  f"instance (instances.count {p.instances} -> {p.instances + 1}) or measure higher concurrency",
                  {"gpu_util_pct": float(util), "concurrency": int(top["concurrency"])},
                  Change(p.model, None, "instances.count", p.instances + 1), weight=(GPU_UTIL_BAR - util) / 100)


def failing_accuracy(manifest: dict, accuracy_budget: float | None) -> list[Advice]:
    """Every variant that failed verification, or whose worst cosine is below the budget."""
    out = []
    for name, entry in sorted(manifest.get("models", {}).items()):
        if entry.get("role", "variant") != "variant":
            continue
        verification = entry.get("verification") or {}
        outputs = verification.get("outputs") or {}
        cosine = min((o["cosine"] for o in outputs.values() if isinstance(o.get("cosine"), (int, float))), default=None)
        failed = entry.get("status") == "failed" or verification.get("passed") is False
        below = accuracy_budget is not None and cosine is not None and cosine < accuracy_budget
        if not (failed or below):
            continue
        tag = variant_tag(name, entry)
        why = (f"failed verification (worst cosine {cosine:.6f})" if failed and cosine is not None else "failed verification") \
            if failed else f"worst cosine {cosine:.6f} < the {accuracy_budget:g} budget"
        precision, calibration = entry.get("precision"), entry.get("calibration", "dynamic")
        if precision == "int8" and calibration == "dynamic":
            step, change = "calibrate it statically (calibration: static)", Change(entry.get("model", name), tag, "calibration", "static")
        elif precision == "fp16":
            step = ("use bf16 (format torch) or int8 instead" if cpu.native_bf16() else
                    "use int8 instead (bf16 too on a GPU; this CPU has no avx512_bf16 or amx_bf16, so bf16 runs slower "
                    "than fp32 here)")
            change = None
        elif precision == "int4":
            step, change = "use int8 instead", None
        else:
            step, change = "loosen its tolerance only if the task allows it, or drop the variant", None
        out.append(Advice("failing-accuracy", name, f"{name} {why}: {step}", {"cosine": cosine, "failed": failed},
                          change, weight=1.0))
    return out


def oversubscribed_threads(p, entry, rows) -> Advice | None:
    """Several instances, each with every core's intra-op threads (instances.threads: 0): when the CPU-side work
    fans out (a large batch joined, converted or run on the CPU) the instances' thread pools spin against each
    other. Seen on the H100: the CLIP image towers fell from 2,339 to 182 infer/s at concurrency 64, the server
    at 1,430 % CPU and the GPU idle."""
    if p.config.get("params", {}).get("threads") != "0" or p.instances < 2:  # set by the spec, not defaulted
        return None
    cores = os.cpu_count() or 1
    value = 1 if p.device == "cuda" else max(1, cores // p.instances)
    why = "a GPU instance's CPU work is copies" if p.device == "cuda" else f"{cores} cores over {p.instances} instances"
    return Advice("oversubscribed-threads", p.variant,
                  f"{p.instances} instances x {cores} intra-op threads each (instances.threads: 0) on {cores} cores: "
                  f"they spin against each other when CPU work fans out; set instances.threads: {value} ({why})",
                  {"instances": p.instances, "threads_each": cores, "cores": cores},
                  Change(p.model, None, "instances.threads", value), weight=0.5)


PROFILE_RULES = (launch_bound, queue_dominates, compute_input_dominates, low_gpu_utilization, oversubscribed_threads)


def advise(profiles: list, manifest: dict, table: pd.DataFrame | None = None, *,
           accuracy_budget: float | None = None) -> list[Advice]:
    """Every rule over every profiled variant, heaviest first; failing-accuracy over the whole manifest."""
    tips: list[Advice] = []
    entries = manifest.get("models", {})
    for p in profiles:
        entry = entries.get(p.variant, {})
        rows = _measured(table, p.variant)
        for rule in PROFILE_RULES:
            tip = rule(p, entry, rows)
            if tip is not None:
                tips.append(tip)
        tip = quantization_wins(p, entry, rows, table=table, manifest=manifest, accuracy_budget=accuracy_budget)
        if tip is not None:
            tips.append(tip)
    tips += failing_accuracy(manifest, accuracy_budget)
    return sorted(tips, key=lambda t: -t.weight)

