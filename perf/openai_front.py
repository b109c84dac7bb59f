"""The OpenAI front's cost, measured by AIPerf: the same streamed load through the front's /v1/completions and
straight to Triton's /v2/models/M/generate_stream (AIPerf's template endpoint), in alternating rounds of one run.

    python perf/openai_front.py --front http://127.0.0.1:9000 --triton http://127.0.0.1:8000 --model smollm \
        --tokenizer model_repository/smollm/1 --out perf/results/front

Every round: synthetic prompts of --prompt-tokens, --output-tokens forced (ignore_eos), --concurrency streams,
AIPerf's own TTFT and inter-token latency per request (its tokenizer counts the tokens of both routes alike). A
first round of each route is not counted (the engine's first steps after a start are slow). Per route, the requests
of every counted round pooled: p50 and p90 of TTFT and of each request's mean inter-token latency; the front's cost
is the ratio of the front's to Triton's, with a 95 % bootstrap interval (requests resampled within each route).
At c=8 a request's TTFT depends mostly on how many prompts queue before it, so one round's p50 of 24 requests
moves by +-10 % on a quiet 2-core machine: pooling rounds, and the interval, say what the run can resolve.
Rounds alternate so that a slow spell of a shared machine falls on both routes.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AIPERF = ROOT / ".tools" / "clients" / "aiperf" / "bin" / "aiperf"
# Triton's generate extension: JSON keys are the model's input tensors; each SSE event carries text_output
TRITON_BODY = ('{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, "ignore_eos": true, '
               '"stream": true}')
METRICS = {"time_to_first_token": "TTFT", "inter_token_latency": "ITL"}


def aiperf(a, route: str, out: Path) -> dict:
    common = [str(a.aiperf), "profile", "--model", a.model, "--streaming", "--tokenizer", a.tokenizer,
              "--concurrency", str(a.concurrency), "--request-count", str(a.requests),
              "--warmup-request-count", str(a.concurrency),
              "--prompt-input-tokens-mean", str(a.prompt_tokens), "--prompt-input-tokens-stddev", "0",
              "--prompt-output-tokens-mean", str(a.output_tokens), "--prompt-output-tokens-stddev", "0",
              "--random-seed", "0", "--ui-type", "none", "--artifact-dir", str(out),
              # AIPerf scrapes BASE_URL/metrics 3 times a second by default: the front answers (and asks Triton for
              # the engine's lines each time), Triton's HTTP port does not, so only the front's route would carry
              # that load (on 2 cores it raised the front's TTFT p50 by ~10 %)
              "--no-server-metrics"]
    if route == "front":
        command = common + ["--url", a.front, "--endpoint-type", "completions", "--extra-inputs", "ignore_eos:true"]
    else:
        template = out.parent / "triton_body.jinja"  # a file: --extra-inputs splits an inline value at commas
        template.write_text(TRITON_BODY)
        command = common + ["--url", a.triton, "--endpoint-type", "template",
                            "--endpoint", f"/v2/models/{a.model}/generate_stream",
                            "--extra-inputs", f"payload_template:{template}",
                            "--extra-inputs", "response_field:text_output"]
    done = subprocess.run(command, capture_output=True, text=True)
    summary = out / "profile_export_aiperf.json"
    if done.returncode != 0 or not summary.is_file():
        sys.exit(f"error: aiperf on the {route} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")
    if json.loads(summary.read_text()).get("error_summary"):
        sys.exit(f"error: aiperf on the {route} saw failed requests: {summary}")
    rows = [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines() if line.strip()]
    rows = [r["metrics"] for r in rows if r["metadata"].get("benchmark_phase") == "profiling"]
    return {name: [r[key]["value"] for r in rows if key in r] for key, name in METRICS.items()}


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q / 100 * len(v)))]


def ratio_interval(front: list[float], triton: list[float], q: float, draws: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of pct(front, q) / pct(triton, q)."""
    rng = random.Random(0)
    got = sorted(pct(rng.choices(front, k=len(front)), q) / pct(rng.choices(triton, k=len(triton)), q)
                 for _ in range(draws))
    return got[int(0.025 * draws)], got[int(0.975 * draws)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--front", required=True, help="the front's base URL, http://host:port")
    ap.add_argument("--triton", required=True, help="Triton's HTTP base URL, http://host:port")
    ap.add_argument("--model", default="smollm")
    ap.add_argument("--tokenizer", required=True, help="the model's tokenizer folder (e.g. REPO/MODEL/1)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=24, help="per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each route, alternating")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--aiperf", type=Path, default=AIPERF, help="AIPerf's command (default: make test-clients' venv)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    pooled: dict[str, dict[str, list[float]]] = {r: {m: [] for m in METRICS.values()} for r in ("triton", "front")}
    per_round: dict[str, list[float]] = {r: [] for r in pooled}
    for i in range(a.rounds + 1):
        for route in pooled:
            got = aiperf(a, route, a.out / f"{i}-{route}")
            print(f"round {i}{' (not counted)' if i == 0 else ''} {route}: {len(got['TTFT'])} requests, "
                  f"TTFT p50 {pct(got['TTFT'], 50):.1f} ms, ITL p50 {pct(got['ITL'], 50):.1f} ms", flush=True)
            if i:
                per_round[route].append(pct(got["TTFT"], 50))
                for m in METRICS.values():
                    pooled[route][m] += got[m]
    lines = [f"AIPerf, c={a.concurrency}, {a.prompt_tokens}-token prompts, {a.output_tokens} tokens forced, "
             f"{a.rounds} counted rounds x {a.requests} requests per route, pooled (ms)", "",
             "| | TTFT p50 | TTFT p90 | ITL p50 | ITL p90 |", "|---|---|---|---|---|"]
    cells = [(m, q) for m in METRICS.values() for q in (50, 90)]
    for route in pooled:
        lines.append(f"| {route} | " + " | ".join(f"{pct(pooled[route][m], q):.1f}" for m, q in cells) + " |")
    ratios = {f"{m} p{q}": (pct(pooled["front"][m], q) / pct(pooled["triton"][m], q),
                            *ratio_interval(pooled["front"][m], pooled["triton"][m], q)) for m, q in cells}
    lines.append("| front / Triton (95 % interval) | " + " | ".join(f"{r:.3f} ({lo:.2f}-{hi:.2f})"
                                                                   for r, lo, hi in ratios.values()) + " |")
    lines.append("\nTTFT p50 of each round: " + "; ".join(f"{route} " + ", ".join(f"{v:.0f}" for v in vals)
                                                          for route, vals in per_round.items()))
    (a.out / "front_cost.md").write_text("\n".join(lines) + "\n")
    (a.out / "front_cost.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                       "pooled": pooled, "ratios": ratios}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
