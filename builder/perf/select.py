"""Which variant is best: a variant's accuracy from its manifest record, its operating point (the
highest stable throughput within a latency budget), and the choice among variants under the budgets.
Read by the perf report, by `tune` (which variant to tune) and by `profile`'s advice."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

BASELINE_FORMATS = ("onnx", "torch")  # the fp32 baseline, in order of preference


@dataclass(frozen=True)
class Accuracy:
    passed: bool | None
    min_cosine: float | None
    max_abs: float | None
    max_rel: float | None


def accuracy_of(record: dict | None) -> Accuracy:
    """Worst numbers over a variant's outputs from its copied verification record."""
    verification = (record or {}).get("verification") or {}
    outputs = verification.get("outputs") or {}

    def worst(key, pick):
        values = [float(o[key]) for o in outputs.values()
                  if isinstance(o, dict) and isinstance(o.get(key), (int, float)) and not math.isnan(float(o[key]))]
        return pick(values) if values else None

    return Accuracy(verification.get("passed"), worst("cosine", min), worst("max_abs", max), worst("max_rel", max))


def choose_baseline(variants: dict[str, dict], baseline: str | None = None) -> str | None:
    """The fp32 baseline among one model's variants: `baseline` if it names one of them (or a
    format, meaning that format's fp32 variant), else the onnx fp32, else the torch fp32."""
    if baseline is not None and baseline in variants:
        return baseline
    names_format = baseline is not None and any(v.get("format") == baseline for v in variants.values())
    formats = (baseline,) if names_format else BASELINE_FORMATS  # a variant of another model: default here
    for fmt in formats:
        for name in sorted(variants):
            info = variants[name]
            if info.get("format") == fmt and info.get("precision") == "fp32" and info.get("role", "variant") == "variant":
                return name
    return None


@dataclass
class Choice:
    variant: str
    row: pd.Series | None  # the operating point: highest stable throughput within the latency budget
    accuracy: Accuracy
    fits: bool
    why_not: str  # empty when it fits


def operating_point(rows: pd.DataFrame, latency_budget_ms: float | None) -> tuple[pd.Series | None, str]:
    """The stable row with the highest throughput whose p99 is within the budget, and why none if none."""
    measured = rows[rows["throughput"].notna()]
    stable = measured[measured["stable"]]
    if stable.empty:
        return None, "no stable measurement" if not measured.empty else "no measurement"
    within = stable if latency_budget_ms is None else stable[stable["p99_ms"] <= latency_budget_ms]
    if within.empty:
        return None, f"p99 {stable['p99_ms'].min():.2f} ms at best exceeds the {latency_budget_ms:g} ms budget"
    return within.loc[within["throughput"].idxmax()], ""


def evaluate(rows: pd.DataFrame, variants: dict[str, dict], latency_budget_ms: float | None,
             accuracy_budget: float | None) -> list[Choice]:
    choices = []
    for name in sorted(rows["variant"].unique()):
        row, why = operating_point(rows[rows["variant"] == name], latency_budget_ms)
        acc = accuracy_of(variants.get(name))
        if not why and accuracy_budget is not None:
            if acc.min_cosine is None:
                why = "no accuracy numbers in the build manifest"
            elif acc.min_cosine < accuracy_budget:
                why = f"cosine {acc.min_cosine:.6f} is below the {accuracy_budget:g} accuracy budget"
        choices.append(Choice(name, row, acc, not why, why))
    return choices


def best_of(choices: list[Choice]) -> Choice | None:
    fitting = [c for c in choices if c.fits]
    return max(fitting, key=lambda c: c.row["throughput"]) if fitting else None
