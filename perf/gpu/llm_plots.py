"""Plots of an LLM bench's served numbers: output tokens/s over time at the highest concurrency, one line per
variant (20 ms windows from perf_analyzer's exports: where a run loses its rate, e.g. at request turnover), and
inter-token latency p50/p99 and tokens/s per variant and concurrency. llm_bench.py writes them with its report;
for a finished run:

    python perf/gpu/llm_plots.py RESULTS_DIR OUT_DIR    # RESULTS_DIR: llm.csv and raw/<model>/c<N>.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plot(results: Path, out: Path, window_ms: float = 20.0) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    sys.path.insert(0, str(HERE.parent))
    from llm_timeline import timeline

    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(8, 4))
    for folder in sorted((results / "raw").iterdir()) if (results / "raw").is_dir() else []:
        exports = sorted(folder.glob("c*.json"), key=lambda f: int(f.stem[1:]))
        if exports:
            rates, _ = timeline(json.loads(exports[-1].read_text()), window_ms)
            ax.plot([i * window_ms for i in range(len(rates))], rates, label=f"{folder.name} ({exports[-1].stem})")
    if ax.lines:
        ax.set_xlabel("ms since the first request")
        ax.set_ylabel(f"output tokens/s ({window_ms:g} ms windows)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "llm_timeline.png", dpi=110)
        written.append(out / "llm_timeline.png")
    plt.close(fig)

    frame = pd.read_csv(results / "llm.csv")
    frame = frame[frame["status"] == "ok"]
    if not frame.empty:
        labels = [f"{v}\nc={c}" for v, c in zip(frame["variant"], frame["concurrency"])]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        x = range(len(frame))
        left.bar([i - 0.2 for i in x], frame["itl_p50_ms"], width=0.4, label="ITL p50")
        left.bar([i + 0.2 for i in x], frame["itl_p99_ms"], width=0.4, label="ITL p99")
        left.set_ylabel("inter-token latency (ms)")
        right.bar(list(x), frame["tokens_per_s"])
        right.set_ylabel("output tokens/s, all streams")
        for axis in (left, right):
            axis.set_xticks(list(x))
            axis.set_xticklabels(labels, fontsize=6, rotation=30, ha="right")
            axis.grid(True, axis="y", alpha=0.3)
        left.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "llm_served.png", dpi=110)
        plt.close(fig)
        written.append(out / "llm_served.png")
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args()
    for path in plot(args.results, args.out):
        print(path)


if __name__ == "__main__":
    main()
