"""report.md from a results directory (results.csv + manifest.json, nothing else); its plots: perf/plots.py.

Per model: the best variant under the budgets and why, every other variant's distance to it, speed
next to accuracy, speedup against the fp32 baseline measured in the same run, and three plots
(throughput vs p99 latency, latency breakdown, speedup). Rows that did not stabilize are flagged
and never chosen as best.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from builder import markdown as md
from builder.errors import UserError
from builder.perf.plots import model_plots
from builder.perf.results import load_steps, load_results
from builder.perf.select import Choice, best_of, choose_baseline, evaluate
from builder.perf.tune import tuned_line

REPORT = "report.md"
FLAG = {"ok": "", "unstable": "⚠ unstable", "missing": "✗ missing", "failed": "✗ failed", "not_run": "✗ not run"}


# --------------------------------------------------------------------------- formatting

def _budget_text(latency_budget_ms, accuracy_budget) -> str:
    parts = [f"p99 ≤ {latency_budget_ms:g} ms" if latency_budget_ms is not None else "no latency budget",
             f"min cosine ≥ {accuracy_budget:g}" if accuracy_budget is not None else "no accuracy budget"]
    return ", ".join(parts)


def _why_best(best: Choice, latency_budget_ms, accuracy_budget, n_fitting: int) -> str:
    r = best.row
    reason = (f"**{best.variant}** is the best choice: the highest stable throughput "
              f"({r['throughput']:.1f} infer/s at concurrency {int(r['concurrency'])})")
    conditions = []
    if latency_budget_ms is not None:
        conditions.append(f"p99 {r['p99_ms']:.2f} ms within the {latency_budget_ms:g} ms budget")
    else:
        conditions.append(f"p99 {r['p99_ms']:.2f} ms")
    if accuracy_budget is not None:
        conditions.append(f"min cosine {best.accuracy.min_cosine:.6f} ≥ {accuracy_budget:g}")
    elif best.accuracy.min_cosine is not None:
        conditions.append(f"min cosine {best.accuracy.min_cosine:.6f}")
    others = f" among {n_fitting} variants that fit" if n_fitting > 1 else ", the only variant that fits"
    return reason + " with " + " and ".join(conditions) + others + "."


# --------------------------------------------------------------------------- the report

def _model_section(model: str, rows: pd.DataFrame, variants: dict[str, dict], results_dir: Path, *,
                   latency_budget_ms, accuracy_budget, baseline, breakdown_concurrency) -> list[str]:
    names = sorted(rows["variant"].unique())
    model_variants = {n: variants.get(n, {"format": rows[rows["variant"] == n]["format"].iloc[0],
                                          "precision": rows[rows["variant"] == n]["precision"].iloc[0]})
                      for n in names}
    base = choose_baseline(model_variants, baseline)
    rows = rows.copy()
    rows["speedup"] = float("nan")
    if base is not None:
        base_tp = rows[rows["variant"] == base].set_index("concurrency")["throughput"]
        rows["speedup"] = rows.apply(lambda r: r["throughput"] / base_tp.get(r["concurrency"], float("nan")), axis=1)
    choices = evaluate(rows, model_variants, latency_budget_ms, accuracy_budget)
    best = best_of(choices)
    plots = model_plots(model, rows, base, results_dir, latency_budget_ms, breakdown_concurrency)

    out = [f"## {model}", ""]
    out.append(f"Budget: {_budget_text(latency_budget_ms, accuracy_budget)}. "
               f"Baseline: {base + ' (fp32, measured in this run)' if base else 'none (no onnx/torch fp32 variant of this model was measured)'}.")
    out.append("")
    shapes = [f"`{n}`: {model_variants[n]['inputs']}" for n in names if model_variants[n].get("inputs")]
    if shapes:
        out += ["Inputs of each request: " + "; ".join(shapes) + ".", ""]
    if best is not None:
        out.append(_why_best(best, latency_budget_ms, accuracy_budget, sum(c.fits for c in choices)))
    else:
        out.append(f"**No variant of {model} fits the budget** ({_budget_text(latency_budget_ms, accuracy_budget)}): "
                   + "; ".join(f"{c.variant}: {c.why_not}" for c in choices) + ".")
    out.append("")
    tuned = tuned_line(results_dir, names)
    if tuned:
        out += [tuned, ""]

    header = ["variant", "format", "precision", "at conc.", "throughput (infer/s)", "× best", "p99 (ms)",
              "Δ p99 vs best (ms)", f"speedup vs {base}" if base else "speedup", "min cosine", "max abs diff",
              "fits", "why not"]
    table = []
    best_row = best.row if best is not None else None
    for c in sorted(choices, key=lambda c: (c.row is None, -(c.row["throughput"] if c.row is not None else 0))):
        info, r = model_variants[c.variant], c.row
        ratio = delta = None
        if r is not None and best_row is not None:
            ratio, delta = r["throughput"] / best_row["throughput"], r["p99_ms"] - best_row["p99_ms"]
        name = f"**{c.variant}**" if best is not None and c.variant == best.variant else c.variant
        table.append([
            name, info.get("format", ""), info.get("precision", ""),
            md.num(r["concurrency"] if r is not None else None, "{:.0f}"),
            md.num(r["throughput"] if r is not None else None, "{:.1f}"),
            md.num(ratio, "{:.2f}×"), md.num(r["p99_ms"] if r is not None else None),
            md.num(delta, "{:+.2f}"), md.num(r["speedup"] if r is not None else None, "{:.2f}×"),
            md.num(c.accuracy.min_cosine, "{:.6f}"), md.num(c.accuracy.max_abs, "{:.3g}"),
            "yes" if c.fits else "no", c.why_not,
        ])
    out += ["Each variant at its operating point (highest stable throughput within the latency budget):", "",
            *md.table(header, table), ""]

    detail_header = ["variant", "concurrency", "throughput (infer/s)", "p50 (ms)", "p90 (ms)", "p95 (ms)", "p99 (ms)",
                     "avg (ms)", "queue (ms)", "compute infer (ms)", "speedup", "attempts", "status"]
    detail = []
    for _, r in rows.sort_values(["variant", "concurrency"]).iterrows():
        detail.append([r["variant"], str(int(r["concurrency"])), md.num(r["throughput"], "{:.1f}"),
                       md.num(r["p50_ms"]), md.num(r["p90_ms"]), md.num(r["p95_ms"]), md.num(r["p99_ms"]), md.num(r["avg_ms"]),
                       md.num(r["server_queue_ms"]), md.num(r["server_compute_infer_ms"]), md.num(r["speedup"], "{:.2f}×"),
                       str(int(r["attempts"])), FLAG.get(r["status"], r["status"]) or "ok"])
    out += ["All measurements:", "", *md.table(detail_header, detail), ""]
    if "throughput_vs_p99" in plots:
        out += [f"![throughput vs p99 latency]({plots['throughput_vs_p99']})", ""]
    if "latency_breakdown" in plots:
        out += [f"![latency breakdown at concurrency {plots['breakdown_concurrency']}]({plots['latency_breakdown']})", ""]
    if "speedup" in plots:
        out += [f"![speedup vs {base}]({plots['speedup']})", ""]
    out += _steps_section(load_steps(results_dir), names)
    out += _usage_section(rows, choices)
    return out


GPU_UTIL_BAR = 80.0  # the product's bar: GPU utilization at the operating point


def _usage_section(rows: pd.DataFrame, choices: list[Choice]) -> list[str]:
    """Server CPU and GPU use sampled during each level (absent from older results: no section)."""
    used = [c for c in ("server_cpu_pct", "gpu_util_pct", "gpu_mem_mb") if c in rows and rows[c].notna().any()]
    if not used:
        return []
    labels = {"server_cpu_pct": "server CPU (% of a core)", "gpu_util_pct": "GPU util (%)", "gpu_mem_mb": "GPU memory (MB)"}
    table = [[r["variant"], str(int(r["concurrency"])), *(md.num(r[c], "{:.0f}") for c in used)]
             for _, r in rows.sort_values(["variant", "concurrency"]).iterrows()]
    out = ["Resource use while measured (mean of samples every 0.5 s; CPU summed over the server and its "
           "python-backend stubs):", "", *md.table(["variant", "concurrency", *(labels[c] for c in used)], table), ""]
    if "gpu_util_pct" in used:
        low = [(c.variant, c.row) for c in choices if c.row is not None and pd.notna(c.row.get("gpu_util_pct"))
               and c.row["gpu_util_pct"] < GPU_UTIL_BAR]
        out += [f"GPU utilization below {GPU_UTIL_BAR:g} % at the operating point: "
                + ", ".join(f"{v} {r['gpu_util_pct']:.0f} % (concurrency {int(r['concurrency'])})" for v, r in low)
                + ". `triton-builder profile` says why.", ""] if low else []
    return out


def _steps_section(steps: pd.DataFrame | None, names: list[str]) -> list[str]:
    """"Where the time goes" for the ensembles among `names`: each step's share of the steps' total time."""
    if steps is None or steps.empty:
        return []
    steps = steps[steps["variant"].isin(names)]
    if steps.empty:
        return []
    header = ["ensemble", "concurrency", "step", "requests", "queue (ms)", "compute infer (ms)", "share"]
    table = [[r["variant"], str(int(r["concurrency"])), r["step"], str(int(r["requests"])), md.num(r["avg_queue_ms"], "{:.3f}"),
              md.num(r["avg_compute_ms"], "{:.3f}"), md.num(r["share"] * 100 if pd.notna(r["share"]) else None, "{:.1f} %")]
             for _, r in steps.iterrows()]
    return ["Where the time goes (ensembles): average queue and compute time per request of each step, "
            "from Triton's per-model statistics over the measured level; share of the steps' total.", "",
            *md.table(header, table), ""]


def write_report(results_dir: Path, *, latency_budget_ms: float | None = None, accuracy_budget: float | None = None,
                 baseline: str | None = None, breakdown_concurrency: int | None = None) -> Path:
    """Write results_dir/report.md and its PNG plots; return the report's path.

    latency_budget_ms: the largest acceptable p99. accuracy_budget: the smallest acceptable cosine
    (worst output, from the build's verification). baseline: a variant name, or a format whose fp32
    variant is the baseline (default: onnx fp32, else torch fp32).
    """
    results_dir = Path(results_dir)
    if (results_dir / "llm.csv").is_file() and not (results_dir / "results.csv").is_file():
        return write_generation_report(results_dir)
    if latency_budget_ms is not None and latency_budget_ms <= 0:
        raise UserError(f"latency budget {latency_budget_ms} ms must be positive")
    if accuracy_budget is not None and not -1 <= accuracy_budget <= 1:
        raise UserError(f"accuracy budget {accuracy_budget} must be a cosine in [-1, 1]")
    table, manifest = load_results(results_dir)
    if table.empty:
        raise UserError(f"{results_dir}: the results table has no rows")
    if baseline is not None and baseline not in set(table["variant"]) and baseline not in set(table["format"]):
        raise UserError(f"baseline {baseline!r} is neither a measured variant ({', '.join(sorted(set(table['variant'])))}) "
                        f"nor a measured format ({', '.join(sorted(set(table['format'])))})")
    variants = manifest.get("variants", {})

    lines = [f"# Performance report: run {manifest.get('run', results_dir.name)}", ""]
    if not manifest.get("complete", False):
        lines += ["> **Incomplete run.** Some levels have no numbers (missing, failed or not run); "
                  "see the status column and the errors below.", ""]
    flagged = table[table["status"] != "ok"]
    if not flagged.empty:
        lines += [f"> **{len(flagged)} measurement(s) flagged:** "
                  + ", ".join(f"{r['variant']} at concurrency {int(r['concurrency'])} ({r['status']})"
                              for _, r in flagged.iterrows())
                  + ". Unstable rows are shown but never chosen as best.", ""]
    for error in manifest.get("errors", []):
        first = str(error).strip().splitlines()
        lines += [f"> Error: {first[0] if first else error}", ""]

    machine = manifest.get("machine", {})
    settings = manifest.get("settings", {})
    server = manifest.get("server") or {}
    pa = manifest.get("perf_analyzer", {})
    lines += [
        f"- Repository: `{manifest.get('repo', '?')}`",
        f"- Started {manifest.get('started', '?')}, finished {manifest.get('finished', '?')}",
        f"- Machine: {machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} cores), "
        f"GPUs: {', '.join(machine.get('gpus') or []) or 'none'}",
        f"- Server: Triton {server.get('version') or '?'} ({server.get('runtime') or 'given'}); "
        f"perf_analyzer: {pa.get('version', '?')} over {settings.get('protocol', '?')}",
        f"- Settings: batch size {settings.get('batch_size', '?')}, window {settings.get('measurement_ms', '?')} ms, "
        f"stability {settings.get('stability_pct', '?')} %, up to {settings.get('max_trials', '?')} trials, "
        f"{settings.get('max_attempts', '?')} attempts per level",
        f"- Latencies are client-side, in ms; throughput counts inferences (batch elements) per second. "
        f"Every perf_analyzer command is in `manifest.json` and `raw/`.",
        "",
    ]
    table = table.copy()  # a CLIP tower is compared with its own baseline, never with the other tower
    table["model"] = [f"{m}_{variants[v]['part']}" if variants.get(v, {}).get("part") else m
                      for m, v in zip(table["model"], table["variant"])]
    for model in sorted(table["model"].unique()):
        lines += _model_section(model, table[table["model"] == model], variants, results_dir,
                                latency_budget_ms=latency_budget_ms, accuracy_budget=accuracy_budget,
                                baseline=baseline, breakdown_concurrency=breakdown_concurrency)
    path = results_dir / REPORT
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def write_generation_report(results_dir: Path) -> Path:
    """report.md for a text-generation run (llm.csv): TTFT / ITL / tokens/s table and plots."""
    import json

    from builder.perf.llm import write_llm_report

    frame = pd.read_csv(results_dir / "llm.csv")
    if frame.empty:
        raise UserError(f"{results_dir}: llm.csv has no rows")
    manifest = json.loads((results_dir / "manifest.json").read_text()) if (results_dir / "manifest.json").is_file() else {}
    machine = manifest.get("machine", {})
    lines = [f"# Performance report: run {manifest.get('run', results_dir.name)}", "",
             f"Machine: {machine.get('cpu', machine) if machine else 'unknown'}.", ""]
    lines += write_llm_report(results_dir, frame)
    path = results_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
