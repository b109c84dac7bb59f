"""profile.md: per variant and batch, time per forward, roofline position, bound, memory, top
operators and category shares; then the advice with its evidence."""

from __future__ import annotations

from pathlib import Path

from builder import markdown as md
from builder.diagnose.records import CATEGORIES, VariantProfile

TOP_OPS = 8


def _fmt(value, spec: str = "{:.2f}", none: str = "–") -> str:
    return none if value is None else spec.format(value)


def _si(value, unit: str) -> str:
    if value is None:
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [*md.table(header, rows), ""]


def summary_rows(p: VariantProfile) -> list[list[str]]:
    rows = []
    for r in p.runs:
        seconds = r.ms_per_forward / 1000
        flops_s = r.flops / seconds if r.flops else None
        bytes_s = r.bytes / seconds if r.bytes else None
        roof = None
        if r.flops and r.bytes and p.peak_flops:
            roof = min(p.peak_flops, r.flops / r.bytes * p.peak["bytes_per_s"])
        rows.append([
            p.variant, str(r.batch), _fmt(r.ms_per_forward), _si(flops_s, "FLOP/s"),
            _fmt(flops_s / p.peak_flops * 100 if flops_s and p.peak_flops else None, "{:.1f} %"),
            _si(bytes_s, "B/s"), _fmt(r.flops / r.bytes if r.flops and r.bytes else None, "{:.1f}"),
            _fmt(flops_s / roof * 100 if flops_s and roof else None, "{:.0f} %"),
            _fmt(r.us_per_op, "{:.1f}"), _fmt(r.busy_ratio * 100 if r.busy_ratio is not None else None, "{:.0f} %"),
            p.bound(r), _si(r.peak_bytes, "B"),
        ])
    return rows


def write_profile_report(out: Path, repo: Path, profiles: list[VariantProfile], tips: list) -> Path:
    lines = [f"# Profile: {repo}", ""]
    peaks = {(p.device, p.peak.get("how")): p.peak for p in profiles if p.peak}
    for (device, how), peak in peaks.items():
        lines.append(f"- {device} peak: {_si(peak['flops'], 'FLOP/s')}, {_si(peak['bytes_per_s'], 'B/s')} "
                     f"(ridge {peak['flops'] / peak['bytes_per_s']:.1f} FLOP/B; {how})")
    lines += ["- FLOPs: torch.utils.flop_counter (torch), matmul-family nodes from onnxruntime's recorded shapes (onnx). "
              "Bytes: every operator's inputs + outputs, no cache reuse (an upper bound; intensity a lower bound).",
              "- Bound: GPU launch-bound when kernels are busy < 60 % of a forward; CPU overhead-bound when the mean "
              "operator takes < 20 µs; else compute- or memory-bound by the roofline's ridge. int8/int4 variants are "
              "not held against the fp32 peak (their integer matmuls run above it).", ""]
    header = ["variant", "batch", "ms / forward", "achieved", "of peak", "bytes/s", "FLOP/B", "of roof", "µs / op",
              "kernels busy", "bound", "peak alloc."]
    lines += ["## Summary", "", *_table(header, [row for p in profiles for row in summary_rows(p)])]
    mem = []
    for p in profiles:
        growth = None
        if len(p.runs) > 1 and p.runs[0].peak_bytes is not None and p.runs[-1].peak_bytes is not None:
            growth = (p.runs[-1].peak_bytes - p.runs[0].peak_bytes) / (p.runs[-1].batch - p.runs[0].batch)
        scaling = None
        if p.all_threads_ms and p.runs:
            scaling = f"{p.runs[-1].ms_per_forward:.2f} ms with {p.threads or 'default'} → {p.all_threads_ms:.2f} ms with all cores"
        mem.append([p.variant, p.device, str(p.threads or "default"), str(p.instances), _si(p.weights_bytes, "B"),
                    ("–" if growth is None else _si(growth, "B") if growth > 0 else "not resolved (peak did not grow)"),
                    scaling or "–"])
    lines += ["## Memory and threads", "",
              *_table(["variant", "device", "threads", "instances", "weights", "activations / batch element",
                       "largest batch: served threads → all cores"], mem)]
    for p in profiles:
        lines += [f"## {p.variant} ({p.format} {p.precision}, {p.device})", ""]
        lines += [f"> {note}" for note in p.notes] + ([""] if p.notes else [])
        for r in p.runs:
            shares = ", ".join(f"{c} {r.shares.get(c, 0):.0%}" for c in CATEGORIES if r.shares.get(c, 0) >= 0.005)
            lines += [f"Batch {r.batch}: {shares}. Trace: [{r.trace}]({r.trace}) (Perfetto / chrome://tracing).", ""]
            lines += _table(["operator", "category", "calls / forward", "self µs / forward", "share"],
                            [[o["name"], o["category"], f"{o['calls']:.0f}", f"{o['self_us']:.1f}",
                              f"{o['self_us'] / max(sum(x['self_us'] for x in r.ops), 1e-9):.1%}"]
                             for o in r.ops[:TOP_OPS]])
    lines += ["## Advice", ""]
    if tips:
        for t in tips:
            change = f" Spec change: `{t.change.describe()}`." if t.change else ""
            lines.append(f"- **{t.rule}** ({t.variant}): {t.message}.{change}")
    else:
        lines.append("No rule fired: nothing here points at a change (give `--results DIR` from `perf` for the "
                     "rules that read the served breakdown).")
    path = Path(out) / "profile.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
