"""The GPU encoder targets, read off one `make bench-gpu` run's results table (results.csv), each with the fp32
eager baseline of the same run beside it; the CLIP text tower is held against an earlier bench (no regression).

`python perf/gpu/targets.py RESULTS.csv [--previous perf/gpu/results-6/results.csv]` prints the table;
bench.py writes it to targets.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
BUDGET_MS = 50.0
BERT = ("bert_torch_bf16_inductor_graphs", "bert6_torch_bf16_inductor_graphs", "bert1_torch_bf16_inductor_graphs",
        "bert_torch_bf16_graphs", "bert_torch_fp16_graphs")
CLIP_IMAGE_U8 = ("clip_u8_image_torch_fp16_graphs",)
CLIP_TEXT = "clip_text_torch_fp16_graphs"
NO_REGRESSION = 0.9  # the text tower keeps at least 90 % of the earlier bench's throughput (runs spread ~10 %)


@dataclass(frozen=True)
class Verdict:
    target: str
    value: float | None  # None: the run has no row for it
    goal: str
    met: bool
    best: str  # which variant (and concurrency) gave the value
    baseline: str  # the fp32 eager number of the same run, in words


def ok(table: pd.DataFrame) -> pd.DataFrame:
    return table[(table["status"] == "ok") & table["throughput"].notna()]


def best_within(table: pd.DataFrame, variants, budget_ms: float = BUDGET_MS):
    """The row with the highest throughput at p99 <= budget among `variants`, or None."""
    rows = ok(table)
    rows = rows[rows["variant"].isin(variants) & (rows["p99_ms"] <= budget_ms)]
    return None if rows.empty else rows.loc[rows["throughput"].idxmax()]


def at(table: pd.DataFrame, variant: str, concurrency: int):
    rows = ok(table)
    rows = rows[(rows["variant"] == variant) & (rows["concurrency"] == concurrency)]
    return None if rows.empty else rows.iloc[0]


def where(row) -> str:
    return f"{row['variant']} at c={int(row['concurrency'])} (p99 {row['p99_ms']:.1f} ms)"


def evaluate(table: pd.DataFrame, previous: pd.DataFrame | None = None) -> list[Verdict]:
    out = []

    def add(target, row, value, goal, met, baseline):
        out.append(Verdict(target, value, goal, bool(met) if value is not None else False,
                           where(row) if row is not None else "not measured", baseline))

    base = best_within(table, ["bert_torch_fp32"])
    base_text = f"fp32 eager {base['throughput']:,.0f}/s ({where(base)})" if base is not None else "fp32 eager: none within budget"
    row = best_within(table, BERT)
    value = float(row["throughput"]) if row is not None else None
    add(f"BERT-base seq 128: infer/s within p99 <= {BUDGET_MS:g} ms", row, value, ">= 12,000",
        value is not None and value >= 12000, base_text)

    rows = ok(table)
    c1 = rows[rows["variant"].isin(BERT) & (rows["concurrency"] == 1)]
    row = None if c1.empty else c1.loc[c1["p50_ms"].idxmin()]
    value = float(row["p50_ms"]) if row is not None else None
    eager = at(table, "bert_torch_fp32", 1)
    add("BERT-base seq 128: p50 ms at concurrency 1", row, value, "<= 1.8", value is not None and value <= 1.8,
        f"fp32 eager {eager['p50_ms']:.2f} ms" if eager is not None else "fp32 eager: not measured")

    eager = at(table, "clip_image_torch_fp32", 64)
    fast = [r for r in (at(table, v, 64) for v in CLIP_IMAGE_U8) if r is not None]
    row = max(fast, key=lambda r: r["throughput"]) if fast else None
    value = float(row["throughput"] / eager["throughput"]) if row is not None and eager is not None else None
    add("CLIP image tower (uint8 pixels) at c=64: x the fp32 eager tower", row, value, ">= 5x",
        value is not None and value >= 5,
        f"fp32 eager {eager['throughput']:,.0f}/s at c=64" if eager is not None else "fp32 eager: not measured at c=64")

    row = best_within(table, CLIP_IMAGE_U8)
    value = float(row["throughput"]) if row is not None else None
    base = best_within(table, ["clip_image_torch_fp32"])
    add(f"CLIP image tower: images/s within p99 <= {BUDGET_MS:g} ms", row, value, ">= 8,000",
        value is not None and value >= 8000,
        f"fp32 eager {base['throughput']:,.0f}/s ({where(base)})" if base is not None else "fp32 eager: none within budget")

    if previous is not None:
        for c in sorted(set(ok(previous)[ok(previous)["variant"] == CLIP_TEXT]["concurrency"])):
            before, now = at(previous, CLIP_TEXT, int(c)), at(table, CLIP_TEXT, int(c))
            value = float(now["throughput"] / before["throughput"]) if now is not None else None
            add(f"CLIP text tower fp16 graphs at c={int(c)}: throughput / the previous run's", now, value,
                f">= {NO_REGRESSION:g}", value is not None and value >= NO_REGRESSION,
                f"previous run {before['throughput']:,.0f}/s")
    return out


def markdown(verdicts: list[Verdict]) -> str:
    lines = ["| target | result | goal | verdict | where | baseline, same run |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        value = "not measured" if v.value is None else f"{v.value:,.2f}" if v.value < 100 else f"{v.value:,.0f}"
        lines.append(f"| {v.target} | {value} | {v.goal} | {'met' if v.met else '**missed**'} | {v.best} | {v.baseline} |")
    met = sum(v.met for v in verdicts)
    return "\n".join(lines) + f"\n\n{met} of {len(verdicts)} targets met.\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", type=Path)
    p.add_argument("--previous", type=Path, default=HERE / "results-6" / "results.csv")
    args = p.parse_args()
    previous = pd.read_csv(args.previous) if args.previous.is_file() else None
    print(markdown(evaluate(pd.read_csv(args.results), previous)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
