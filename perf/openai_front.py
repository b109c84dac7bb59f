"""The OpenAI front's cost, measured by AIPerf: the same streamed load through the front's /v1/completions and
straight to Triton's /v2/models/M/generate_stream (AIPerf's template endpoint), in alternating rounds of one run.

    python perf/openai_front.py --front http://127.0.0.1:9000 --triton http://127.0.0.1:8000 --model smollm \
        --tokenizer model_repository/smollm/1 --out perf/results/front

Every round: synthetic prompts of --prompt-tokens, --output-tokens forced (ignore_eos), --concurrency streams,
AIPerf's own TTFT and inter-token latency (its tokenizer counts the tokens of both routes alike). Per route: the
median over rounds of each round's p50 and p90; the front's cost is the ratio of those medians to Triton's.
Rounds alternate so that a slow spell of a shared machine falls on both routes.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
              "--random-seed", "0", "--ui-type", "none", "--artifact-dir", str(out)]
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
    got = json.loads(summary.read_text())
    if got.get("error_summary"):
        sys.exit(f"error: aiperf on the {route} saw failed requests: {got['error_summary']}")
    return {METRICS[k] + " " + q: got[k][q] for k in METRICS for q in ("p50", "p90")}


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
    rounds: dict[str, list[dict]] = {"triton": [], "front": []}
    for i in range(a.rounds):
        for route in rounds:
            rounds[route].append(got := aiperf(a, route, a.out / f"{i}-{route}"))
            print(f"round {i} {route}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in got.items()), flush=True)
    keys = list(rounds["front"][0])
    median = {route: {k: statistics.median(r[k] for r in rows) for k in keys} for route, rows in rounds.items()}
    lines = [f"AIPerf, c={a.concurrency}, {a.prompt_tokens}-token prompts, {a.output_tokens} tokens forced, "
             f"{a.rounds} rounds x {a.requests} requests per route (ms: the median of the rounds' percentiles)", "",
             "| route | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {route} | " + " | ".join(f"{median[route][k]:.1f}" for k in keys) + " |" for route in median]
    lines.append("| front / Triton | " + " | ".join(f"{median['front'][k] / median['triton'][k]:.3f}" for k in keys)
                 + " |")
    spread = {route: {k: (min(r[k] for r in rows), max(r[k] for r in rows)) for k in keys} for route, rows in rounds.items()}
    lines.append("\nspread over rounds (min-max): " + "; ".join(
        f"{route} {k} {lo:.1f}-{hi:.1f}" for route in spread for k, (lo, hi) in spread[route].items() if k.endswith("p50")))
    (a.out / "front_cost.md").write_text("\n".join(lines) + "\n")
    (a.out / "front_cost.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                       "rounds": rounds, "median": median}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
