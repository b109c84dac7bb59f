"""Where a streamed LLM run lost its throughput: output tokens per time window over the whole run, from a
perf_analyzer profile export (what `perf` keeps under raw/<model>/c<N>.json), and the longest inter-token
gaps with when they happened. A window where few tokens came out while streams were open is time the
server spent on something else (prompt steps, a stall).

    python perf/llm_timeline.py RAW_EXPORT.json [--window-ms 20] [--gaps 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def timeline(export: dict, window_ms: float = 20.0) -> tuple[list[float], list[tuple[float, float]]]:
    """(tokens/s per window from the first request's start, [(gap ms per token, at ms)] longest first)."""
    requests = [r for e in export["experiments"] for r in e["requests"] if r.get("response_timestamps")]
    t0 = min(r["timestamp"] for r in requests)
    windows: dict[int, int] = {}
    gaps = []
    for r in requests:
        stamps = [(t - t0) / 1e6 for t in r["response_timestamps"]]
        counts = [int(o.get("num_output_tokens", 0) or 0) for o in r.get("response_outputs") or []]
        if not any(counts):  # one token per response
            counts = list(range(1, len(stamps) + 1))
        previous = 0
        for i, (at, count) in enumerate(zip(stamps, counts)):
            new = count - previous
            windows[int(at // window_ms)] = windows.get(int(at // window_ms), 0) + max(new, 0)
            if i and new > 0:
                gaps.append(((at - stamps[i - 1]) / new, at))
            previous = max(previous, count)
    rates = [windows.get(i, 0) / (window_ms / 1e3) for i in range(max(windows) + 1)]
    return rates, sorted(gaps, reverse=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("--window-ms", type=float, default=20.0)
    p.add_argument("--gaps", type=int, default=10)
    a = p.parse_args()
    rates, gaps = timeline(json.loads(a.export.read_text()), a.window_ms)
    print(f"output tokens/s per {a.window_ms:g} ms window:")
    print(" ".join(f"{r:.0f}" for r in rates))
    print("longest gaps (ms per token @ ms since the start):",
          ", ".join(f"{g:.1f} @ {at:.0f}" for g, at in gaps[:a.gaps]))


if __name__ == "__main__":
    main()
