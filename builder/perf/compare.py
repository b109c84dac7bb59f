"""`triton-builder compare BASE NEW`: a regression gate over two `perf` results directories.

Per variant and concurrency level measured in both, the change in throughput, p50 and p99, each
against a noise band. Each run's number is known to within its own band:

- what perf_analyzer guarantees for a level: its last windows agreed within the stability
  threshold (`-s`, 25 % by default; the relaxed threshold for a level flagged unstable). That covers
  throughput and the latency perf_analyzer stabilizes (the average, taken here for p50 too; p99 only
  when the run stabilized on `--percentile 99`);
- with `perf --repeats N` (a repeats.csv beside results.csv) the values are the medians over the
  repeats and the band is at least their spread, (max - min) / median; repeats within one run do not
  see the machine's load change between runs, so the stability threshold stays the floor.

The band of a change is the two runs' bands added (their intervals must not overlap); a p99 without
repeats or p99 stabilization has no band and is shown, not judged. A change is a regression when it
is worse (less throughput, more latency) by more than both that band and the threshold (default
10 %); an improvement likewise. Levels or variants measured
in one run only, or without numbers in either, are listed, never compared. compare.md, compare.csv
and compare.png go to `out` (default: NEW).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from builder import markdown as md
from builder.errors import UserError
from builder.perf.results import REPEATS_CSV, load_results

METRICS = (("throughput", "throughput", +1), ("p50_ms", "p50", -1), ("p99_ms", "p99", -1))  # +1: higher is better
KEY = ["variant", "concurrency"]
VERDICTS = ("regressed", "improved", "same", "not judged")


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per compared (variant, concurrency)
    not_compared: list[str] = field(default_factory=list)  # one line each: what is missing where
    notes: list[str] = field(default_factory=list)  # settings or machines that differ
    threshold_pct: float = 10.0

    @property
    def regressions(self) -> pd.DataFrame:
        return self.table[self.table["verdict"] == "regressed"]


def _noise(results_dir: Path, table: pd.DataFrame, manifest: dict, rename: dict | None = None) -> pd.DataFrame:
    """Per (variant, concurrency): each metric's value (the repeats' median when there are repeats),
    its noise band in percent, and where the band came from."""
    settings = manifest.get("settings", {})
    stable_pct = float(settings.get("stability_pct") or 25.0)
    relaxed_pct = float(settings.get("relaxed_stability_pct") or 100.0)
    stabilized = {"throughput", "p50_ms"} | ({"p99_ms"} if settings.get("percentile") == 99 else set())
    out = table[KEY].copy()
    out["noise_source"] = "stability"
    for metric, _, _ in METRICS:
        out[f"{metric}_noise_pct"] = [(stable_pct if ok else relaxed_pct) if metric in stabilized else math.nan
                                      for ok in table["status"].eq("ok")]
    repeats_path = Path(results_dir) / REPEATS_CSV
    if repeats_path.is_file():
        repeats = pd.read_csv(repeats_path)
        repeats["variant"] = repeats["variant"].replace(rename or {})
        repeats = repeats[repeats["throughput"].notna()]
        grouped = repeats.groupby(KEY)
        index = out.set_index(KEY).index
        for metric, _, _ in METRICS:
            spread = grouped[metric].agg(lambda s: (s.max() - s.min()) / s.median() * 100 if len(s) > 1 else math.nan)
            spread = pd.Series(index.map(spread.to_dict()), index=out.index, dtype=float)
            out[f"{metric}_noise_pct"] = pd.concat([out[f"{metric}_noise_pct"], spread], axis=1).max(axis=1, skipna=True)
            median = pd.Series(index.map(grouped[metric].median().to_dict()), index=out.index, dtype=float)
            out[f"{metric}_median"] = median
        counts = out.set_index(KEY).index.map(grouped.size().to_dict())
        out.loc[pd.notna(counts) & (counts > 1), "noise_source"] = [f"{int(n)} repeats" for n in counts[pd.notna(counts) & (counts > 1)]]
    return out


def _with_medians(table: pd.DataFrame) -> pd.DataFrame:
    """Replace each metric by its repeats' median where there were repeats."""
    for metric, _, _ in METRICS:
        if f"{metric}_median" in table:
            table[metric] = table[f"{metric}_median"].where(table[f"{metric}_median"].notna(), table[metric])
            table = table.drop(columns=f"{metric}_median")
    return table


def compare_runs(base_dir: Path, new_dir: Path, threshold_pct: float = 10.0,
                 rename_new: dict[str, str] | None = None) -> Comparison:
    """`rename_new`: variant names of NEW to read as BASE's (a changed variant built under a new name)."""
    if not threshold_pct > 0:
        raise UserError(f"--threshold {threshold_pct}: give a positive percentage, e.g. 10")
    (base, base_manifest), (new, new_manifest) = load_results(base_dir), load_results(new_dir)
    if rename_new:
        new["variant"] = new["variant"].replace(rename_new)
    notes = [f"{what} differs: base {b!r}, new {n!r}" for what, b, n in (
        ("batch size", base_manifest.get("settings", {}).get("batch_size"), new_manifest.get("settings", {}).get("batch_size")),
        ("protocol", base_manifest.get("settings", {}).get("protocol"), new_manifest.get("settings", {}).get("protocol")),
        ("CPU", base_manifest.get("machine", {}).get("cpu"), new_manifest.get("machine", {}).get("cpu")),
        ("GPUs", base_manifest.get("machine", {}).get("gpus"), new_manifest.get("machine", {}).get("gpus")),
    ) if b != n]

    base, new = (_with_medians(t.merge(_noise(d, t, m, r), on=KEY))
                 for t, d, m, r in ((base, base_dir, base_manifest, None), (new, new_dir, new_manifest, rename_new)))
    merged = base.merge(new, on=KEY, how="outer", suffixes=("_base", "_new"), indicator=True)
    not_compared = []
    for variant in sorted(set(base["variant"]) ^ set(new["variant"])):
        not_compared.append(f"{variant}: measured only in {'base' if variant in set(base['variant']) else 'new'}")
    rows = []
    for _, r in merged.sort_values(KEY).iterrows():
        where = f"{r['variant']} at concurrency {int(r['concurrency'])}"
        if r["_merge"] != "both":
            if r["variant"] in set(base["variant"]) and r["variant"] in set(new["variant"]):
                not_compared.append(f"{where}: measured only in {'base' if r['_merge'] == 'left_only' else 'new'}")
            continue
        empty = [side for side in ("base", "new") if pd.isna(r[f"throughput_{side}"])]
        if empty:
            not_compared.append(f"{where}: no numbers in {' and '.join(empty)} "
                                f"({', '.join(str(r[f'status_{s}']) for s in empty)})")
            continue
        row = {"variant": r["variant"], "concurrency": int(r["concurrency"]),
               "status": "/".join(dict.fromkeys([str(r["status_base"]), str(r["status_new"])])),
               "noise_source": " / ".join(dict.fromkeys([r["noise_source_base"], r["noise_source_new"]]))}
        verdicts = []
        for metric, label, better in METRICS:
            b, n = float(r[f"{metric}_base"]), float(r[f"{metric}_new"])
            change = (n - b) / b * 100 if b > 0 else math.nan
            band = float(r[f"{metric}_noise_pct_base"]) + float(r[f"{metric}_noise_pct_new"])
            bar = max(band, threshold_pct)
            if math.isnan(change) or math.isnan(band):
                verdict = "not judged"
            elif abs(change) <= bar:
                verdict = "same"
            else:
                verdict = "improved" if change * better > 0 else "regressed"
            row.update({f"{label}_base": b, f"{label}_new": n, f"{label}_change_pct": change,
                        f"{label}_noise_pct": band, f"{label}_verdict": verdict})
            verdicts.append(verdict)
        row["verdict"] = next((v for v in ("regressed", "improved") if v in verdicts), "same")
        rows.append(row)
    return Comparison(pd.DataFrame(rows), not_compared, notes, threshold_pct)


# --------------------------------------------------------------------------- output

def _cell(row, label: str, unit: str) -> str:
    fmt = "{:.1f}" if label == "throughput" else "{:.2f}"
    mark = {"regressed": " ✗", "improved": " ✓", "same": "", "not judged": ""}[row[f"{label}_verdict"]]
    band = "?" if math.isnan(row[f"{label}_noise_pct"]) else f"{row[f'{label}_noise_pct']:.0f}"
    return (f"{fmt.format(row[f'{label}_base'])} → {fmt.format(row[f'{label}_new'])}{unit} "
            f"({row[f'{label}_change_pct']:+.1f} % ±{band}){mark}")


def markdown(c: Comparison, base_dir: Path, new_dir: Path) -> str:
    lines = [f"# Compare: {Path(new_dir).name} against {Path(base_dir).name}", "",
             f"Base `{base_dir}`, new `{new_dir}`. A change counts when it is beyond both its noise band (±, "
             f"from perf_analyzer's stability threshold or the spread of repeats, both runs' added) and the {c.threshold_pct:g} % "
             "threshold; ✗ worse, ✓ better; ±? not judged (p99 needs `perf --repeats` or a run stabilized on p99).", ""]
    for note in c.notes:
        lines += [f"> Note: {note}; the numbers may not be comparable.", ""]
    n_reg = len(c.regressions)
    lines += [f"**{n_reg} regression(s)**" if n_reg else "**No regression.**", ""]
    if not c.table.empty:
        header = ["variant", "conc.", "throughput (infer/s)", "p50 (ms)", "p99 (ms)", "verdict", "noise from", "status"]
        rows = [[r["variant"], str(r["concurrency"]), _cell(r, "throughput", ""), _cell(r, "p50", ""),
                 _cell(r, "p99", ""), f"**{r['verdict']}**" if r["verdict"] != "same" else "same",
                 r["noise_source"], r["status"]] for _, r in c.table.iterrows()]
        lines += [*md.table(header, rows), ""]
    if c.not_compared:
        lines += ["Not compared:", ""] + [f"- {line}" for line in c.not_compared] + [""]
    return "\n".join(lines)


def plot(c: Comparison, path: Path) -> Path | None:
    if c.table.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['variant']}\nc={r['concurrency']}" for _, r in c.table.iterrows()]
    colors = {"regressed": "tab:red", "improved": "tab:green", "same": "tab:grey"}
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 0.9 * len(labels) * 3), 4.5), sharey=False)
    for ax, (_, label, better) in zip(axes, METRICS):
        x = range(len(labels))
        ax.bar(x, c.table[f"{label}_change_pct"], yerr=c.table[f"{label}_noise_pct"].fillna(0), capsize=3,
               color=[colors.get(v, "lightgrey") for v in c.table[f"{label}_verdict"]])
        for sign in (-1, 1):
            ax.axhline(sign * c.threshold_pct, color="black", linestyle="--", linewidth=0.8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(x), labels, fontsize=7, rotation=30)
        ax.set_title(f"{label}: change % ({'higher' if better > 0 else 'lower'} is better)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"new vs base: bars = change, whiskers = noise band, dashed = ±{c.threshold_pct:g} % threshold; red = regressed, green = improved, "
                 "light grey = not judged",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison(base_dir: Path, new_dir: Path, *, threshold_pct: float = 10.0,
                     out: Path | None = None, rename_new: dict[str, str] | None = None) -> tuple[Comparison, Path]:
    """Compare, write compare.md / compare.csv / compare.png into `out` (default NEW); return both."""
    c = compare_runs(Path(base_dir), Path(new_dir), threshold_pct, rename_new)
    out = Path(out) if out is not None else Path(new_dir)
    out.mkdir(parents=True, exist_ok=True)
    c.table.to_csv(out / "compare.csv", index=False)
    text = markdown(c, base_dir, new_dir)
    if plot(c, out / "compare.png") is not None:
        text += "\n![change per variant and level](compare.png)\n"
    (out / "compare.md").write_text(text)
    return c, out / "compare.md"
