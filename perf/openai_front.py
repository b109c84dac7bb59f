"""The OpenAI front's cost: TTFT and inter-token latency of the same streamed requests through the front
(/v1/completions, stream) and straight to Triton (/v2/models/M/generate_stream), alternating rounds in one run.

    python perf/openai_front.py --front http://127.0.0.1:9000 --triton 127.0.0.1:8000 --model smollm

Per request: TTFT = first event with text; ITL = (last text event - first) / (tokens - 1), tokens from the
final usage (the server may send several tokens per event). Prints a markdown table (p50 / p90, milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp

PROMPT = ("Continuous batching lets a request join the running batch at the next step, and leave it as soon as it "
          "ends, so short answers do not wait for long ones. ") * 4


async def one(session, url: str, body: dict, front: bool) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with session.post(url, json=body) as answer:
        answer.raise_for_status()
        async for raw in answer.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            text = event["choices"][0]["text"] if front and event.get("choices") else event.get("text_output", "")
            if front and event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif not front and event.get("num_output_tokens"):
                tokens = event["num_output_tokens"]
            if text:
                now = time.perf_counter()
                first = first or now
                last = now
    return (first - t0) * 1e3, (last - first) * 1e3 / max(1, tokens - 1)


async def round_(url: str, body: dict, front: bool, requests: int, concurrency: int) -> list[tuple[float, float]]:
    queue = list(range(requests))
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        async def worker():
            while queue:
                queue.pop()
                out.append(await one(session, url, body, front))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--front", required=True, help="the front's base URL, http://host:port")
    ap.add_argument("--triton", required=True, help="Triton's HTTP host:port")
    ap.add_argument("--model", default="smollm")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16, help="per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each, alternating")
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    common = {"max_tokens": a.max_tokens, "ignore_eos": True, "stream": True}
    front_body = {"model": a.model, "prompt": PROMPT, "stream_options": {"include_usage": True}, **common}
    triton_body = {"text_input": PROMPT, **common}
    got: dict[str, list] = {"front": [], "triton": []}
    await round_(f"http://{a.triton}/v2/models/{a.model}/generate_stream", triton_body, False, a.concurrency,
                 a.concurrency)  # warm-up
    for _ in range(a.rounds):
        got["triton"] += await round_(f"http://{a.triton}/v2/models/{a.model}/generate_stream", triton_body, False,
                                      a.requests, a.concurrency)
        got["front"] += await round_(f"{a.front}/v1/completions", front_body, True, a.requests, a.concurrency)
    print(f"| route | requests | TTFT p50 | TTFT p90 | ITL p50 | ITL p90 |  (c={a.concurrency}, "
          f"{a.max_tokens} tokens, ms)\n|---|---|---|---|---|---|")
    for name, rows in got.items():
        ttft, itl = [r[0] for r in rows], [r[1] for r in rows]
        print(f"| {name} | {len(rows)} | {pct(ttft, 50):.0f} | {pct(ttft, 90):.0f} | {pct(itl, 50):.1f} | "
              f"{pct(itl, 90):.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
