"""The perf report's plots of one model: throughput against p99 latency, the latency breakdown at one
concurrency, and the speedup against the fp32 baseline (PNG files beside report.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

BREAKDOWN = [  # (column(s), label) stacked bottom to top
    (("server_queue_ms",), "queue"),
    (("server_compute_input_ms",), "compute input"),
    (("server_compute_infer_ms",), "compute infer"),
    (("server_compute_output_ms",), "compute output"),
    (("network_ms",), "network + server send/recv"),
    (("client_send_ms", "client_recv_ms"), "client send/recv"),
]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def model_plots(model: str, rows: pd.DataFrame, baseline: str | None, out: Path,
                latency_budget_ms: float | None, breakdown_concurrency: int | None) -> dict[str, str]:
    """The PNG files written for `model` into `out`: {kind: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}
    measured = rows[rows["throughput"].notna()]
    if measured.empty:
        return made
    slug = _slug(model)

    # Throughput vs p99 latency: one line per variant across concurrency levels.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, group in measured.groupby("variant", sort=True):
        group = group.sort_values("concurrency")
        (line,) = ax.plot(group["p99_ms"], group["throughput"], "-", label=name)
        for _, r in group.iterrows():
            ax.plot(r["p99_ms"], r["throughput"], "o", color=line.get_color(),
                    markerfacecolor=line.get_color() if r["stable"] else "none")
            ax.annotate(f"c={int(r['concurrency'])}", (r["p99_ms"], r["throughput"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    if latency_budget_ms is not None:
        ax.axvline(latency_budget_ms, color="grey", linestyle="--", linewidth=1, label=f"p99 budget {latency_budget_ms:g} ms")
    spread = lambda s: s[s > 0].max() / s[s > 0].min() if (s > 0).any() else 1.0  # noqa: E731
    log_x, log_y = spread(measured["p99_ms"]) > 20, spread(measured["throughput"]) > 20  # an outlier variant
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("p99 latency (ms)" + (", log scale" if log_x else ""))
    ax.set_ylabel("throughput (infer/s)" + (", log scale" if log_y else ""))
    ax.set_title(f"{model}: throughput vs p99 latency (hollow = unstable)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    made["throughput_vs_p99"] = f"{slug}_throughput_vs_p99.png"
    fig.savefig(out / made["throughput_vs_p99"], dpi=110)
    plt.close(fig)

    # Latency breakdown at one concurrency level.
    level = breakdown_concurrency
    if level is None:
        per_variant = [set(g["concurrency"]) for _, g in measured.groupby("variant")]
        common = set.intersection(*per_variant) if per_variant else set()
        level = max(common) if common else int(measured["concurrency"].min())
    at = measured[measured["concurrency"] == level].sort_values("variant")
    if not at.empty:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(at) + 3), 4.5))
        bottom = [0.0] * len(at)
        labels = list(at["variant"])
        for columns, label in BREAKDOWN:
            values = at[list(columns)].fillna(0).sum(axis=1).tolist()
            ax.bar(labels, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel("average latency (ms)")
        ax.set_title(f"{model}: latency breakdown at concurrency {level}")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        made["latency_breakdown"] = f"{slug}_latency_breakdown.png"
        made["breakdown_concurrency"] = str(level)
        fig.savefig(out / made["latency_breakdown"], dpi=110)
        plt.close(fig)

    # Speedup vs the fp32 baseline, per concurrency level.
    if baseline is not None and "speedup" in measured and measured["speedup"].notna().any():
        pivot = measured.pivot_table(index="concurrency", columns="variant", values="speedup")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        pivot.plot.bar(ax=ax, rot=0)
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(f"throughput / {baseline}")
        ax.set_title(f"{model}: speedup vs {baseline}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        made["speedup"] = f"{slug}_speedup.png"
        fig.savefig(out / made["speedup"], dpi=110)
        plt.close(fig)
    return made
