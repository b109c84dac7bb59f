"""Measure text-generation endpoints the way LLM servers are measured, with perf_analyzer's streaming mode.

For each model and concurrency: perf_analyzer over gRPC with `--streaming`, a fixed number of requests
(`--request-count`), synthetic prompts of N tokens (the model's own tokenizer) and the output length forced
(`max_tokens` = M, `ignore_eos`), and `--profile-export-file` for every response's timestamp. From those:
time to first token (request sent -> first response), inter-token latency (gap between responses / tokens
in the later one), output tokens/s per stream and in total, requests/s. Works against any endpoint with
the TensorRT-LLM / vLLM tensor names: each request is written in the endpoint's own inputs (`request_entry`).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from builder import markdown as md
from builder.errors import RunError, UserError
from builder.perf.analyzer import find_perf_analyzer, perf_env

FILLER = ("Triton serves models from a repository on disk, and dynamic batching groups requests that arrive close "
          "together so that the accelerator runs fewer, larger batches. ")
COLUMNS = ["model", "variant", "precision", "concurrency", "prompt_tokens", "output_tokens", "requests",
           "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tokens_per_s_per_stream", "tokens_per_s",
           "requests_per_s", "status"]


def synthetic_prompt(tokenizer_file: Path, tokens: int) -> tuple[str, int]:
    """A text of `tokens` tokens (as the model's tokenizer counts them, special tokens included)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    ids = tok.encode(FILLER * (tokens // 8 + 2), add_special_tokens=False).ids
    special = len(tok.encode("x", add_special_tokens=True).ids) - len(tok.encode("x", add_special_tokens=False).ids)
    text = tok.decode(ids[:max(tokens - special, 1)])
    return text, len(tok.encode(text, add_special_tokens=True).ids)


def generation_request(text: str, output_tokens: int, fmt: str = "torch", flow: str = "llmapi",
                       sampling: dict[str, float] | None = None):
    """One streaming request as the endpoint takes it (its format record's `request`), the output length forced
    with whichever of ignore_eos / min_tokens its backend has. `sampling`: temperature and/or top_p (default:
    greedy), as a chat client would send them."""
    from builder import formats

    record = formats.get(fmt, "generation")
    fields = {"text_input": text, "max_tokens": output_tokens, "stream": True,
              **{k: float(v) for k, v in (sampling or {}).items()}}
    fields |= {k: v for k, v in {"ignore_eos": True, "min_tokens": output_tokens}.items() if k in record.honours(flow)}
    return record.request(fields, flow)


def request_entry(text: str, output_tokens: int, fmt: str = "torch", flow: str = "llmapi",
                  sampling: dict[str, float] | None = None) -> dict:
    """generation_request's tensors, as perf_analyzer's input data holds them."""
    return generation_request(text, output_tokens, fmt, flow, sampling).inputs


def input_data(path: Path, text: str, output_tokens: int, fmt: str = "torch", flow: str = "llmapi",
               sampling: dict[str, float] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": [request_entry(text, output_tokens, fmt, flow, sampling)]}, ensure_ascii=False))
    return path


def command(binary: Path, model: str, url: str, concurrency: int, requests: int, data: Path, export: Path) -> list[str]:
    return [str(binary), "-m", model, "-u", url, "-i", "grpc", "--streaming", "--concurrency-range",
            f"{concurrency}:{concurrency}", "--request-count", str(requests), "--input-data", str(data),
            "--profile-export-file", str(export), "--measurement-interval", "600000"]


def summarize(export: dict, concurrency: int, counting: str | None = "total") -> dict:
    """TTFT, ITL and throughput from a perf_analyzer profile export (timestamps in ns). `counting`: how the
    endpoint's num_output_tokens reads (GenerationRequest.counts): the running "total", each response's own
    ("delta"), or None (not sent: one token per response)."""
    experiment = next(e for e in export["experiments"] if e["experiment"]["value"] == concurrency)
    ttft, itl, per_stream, tokens, starts, ends = [], [], [], 0, [], []
    for req in experiment["requests"]:
        stamps = req.get("response_timestamps") or []
        outs = req.get("response_outputs") or []
        if not stamps:
            continue
        counts = [int(o.get("num_output_tokens", 0) or 0) for o in outs] if outs and counting else []
        if counting == "delta":  # each response's own tokens: the running total
            counts = [int(c) for c in np.cumsum(counts)]
        if not any(counts):  # an endpoint that does not return num_output_tokens: one token per response
            counts = []
        # a response may carry several tokens (text held back until a character is whole)
        n_tokens = max(counts) if counts else len(stamps)
        start, first, last = req["timestamp"], stamps[0], stamps[-1]
        ttft.append((first - start) / 1e6)
        previous = counts[0] if counts else 1
        for i in range(1, len(stamps)):
            produced = (counts[i] - previous) if counts else 1
            if produced > 0:
                itl.extend([(stamps[i] - stamps[i - 1]) / 1e6 / produced] * produced)
                previous = counts[i] if counts else previous
        tokens += n_tokens
        per_stream.append(n_tokens / max((last - start) / 1e9, 1e-9))
        starts.append(start)
        ends.append(last)
    if not ttft:
        raise RunError("perf_analyzer's profile export has no responses")
    wall = (max(ends) - min(starts)) / 1e9
    pct = lambda values, q: float(np.percentile(values, q)) if values else float("nan")  # noqa: E731
    return {"requests": len(ttft), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
            "tokens_per_s_per_stream": float(np.mean(per_stream)), "tokens_per_s": tokens / wall,
            "requests_per_s": len(ttft) / wall}


def _tokenizer_file(repo: Path, name: str) -> Path:
    """Our endpoint's tokenizer, or a rendered target's local Hugging Face folder's."""
    for path in (repo / name / "1" / "tokenizer.json", repo / name / "hf" / "tokenizer.json"):
        if path.is_file():
            return path
    raise UserError(f"{name}: no tokenizer.json in {repo / name} (1/ or hf/) to make prompts of N tokens; rebuild the "
                    "repository from a local source, or measure the torch variant")


def run_llm_perf(repo: Path, variants: dict[str, dict], server, concurrency: list[int], out: Path,
                 prompt_tokens: int = 32, output_tokens: int = 64, requests_per_level: int | None = None,
                 perf_analyzer: Path | None = None, console: Console | None = None,
                 sampling: dict[str, float] | None = None) -> Path:
    """Measure every generation endpoint in `variants` (name -> manifest entry) on a running server; every
    request greedy, or sampled with `sampling` (temperature, top_p)."""
    console = console or Console(highlight=False)
    binary = find_perf_analyzer(perf_analyzer)
    env = perf_env()
    rows, commands = [], []
    for name, entry in variants.items():
        gen = entry.get("generation", {})
        if prompt_tokens > gen.get("max_prompt_tokens", prompt_tokens) or \
                prompt_tokens + output_tokens > gen.get("max_total_tokens", prompt_tokens + output_tokens):
            raise UserError(f"{name}: --prompt-tokens {prompt_tokens} + --output-tokens {output_tokens} exceed its "
                            f"limits (max_prompt_tokens {gen.get('max_prompt_tokens')}, max_total_tokens "
                            f"{gen.get('max_total_tokens')})")
        text, actual = synthetic_prompt(_tokenizer_file(repo, name), prompt_tokens)
        fmt, flow = entry.get("format", "torch"), entry.get("flow", "llmapi")
        data = input_data(out / "inputs" / f"{name}.json", text, output_tokens, fmt, flow, sampling)
        counts = generation_request(text, output_tokens, fmt, flow, sampling).counts
        console.print(f"[bold]{name}[/bold] ({entry.get('precision')}): prompt {actual} tokens, output {output_tokens} "
                      f"tokens, concurrency {', '.join(map(str, concurrency))}")
        for level in concurrency:
            count = requests_per_level or max(2 * level, 4)
            export = out / "raw" / name / f"c{level}.json"
            export.parent.mkdir(parents=True, exist_ok=True)
            argv = command(binary, name, server.grpc_url, level, count, data, export)
            t0 = time.time()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
            commands.append({"variant": name, "command": argv, "returncode": proc.returncode,
                             "seconds": round(time.time() - t0, 2)})
            row = {"model": entry.get("model", name), "variant": name, "precision": entry.get("precision", ""),
                   "concurrency": level, "prompt_tokens": actual, "output_tokens": output_tokens}
            if proc.returncode != 0 or not export.is_file():
                tail = " ".join((proc.stderr or proc.stdout).split()[-40:])
                rows.append({**row, "status": "failed"})
                console.print(f"  c={level}: [red]perf_analyzer failed[/] ({tail})")
                continue
            stats = summarize(json.loads(export.read_text()), level, counts)
            rows.append({**row, **stats, "status": "ok"})
            console.print(f"  c={level}: TTFT p50 {stats['ttft_p50_ms']:.0f} ms, ITL p50 {stats['itl_p50_ms']:.1f} ms "
                          f"(p99 {stats['itl_p99_ms']:.1f}), {stats['tokens_per_s_per_stream']:.1f} tok/s per stream, "
                          f"{stats['tokens_per_s']:.1f} tok/s in all")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.to_csv(out / "llm.csv", index=False)
    return out


def measure_generators(repo: Path, variants: dict[str, dict], *, server, concurrency: list[int], out: Path | None,
                       prompt_tokens: int, output_tokens: int, perf_analyzer: Path | None = None,
                       console: Console | None = None, sampling: dict[str, float] | None = None) -> Path:
    """run_llm_perf with a results directory (llm.csv + manifest.json) and, when none is given, a server."""
    import contextlib
    from datetime import datetime, timezone

    from builder.perf.results import machine_info, new_results_dir, server_record, tool_versions, variant_record

    console = console or Console(highlight=False)
    started = datetime.now(timezone.utc)
    results = new_results_dir(out, started)
    manifest = {"schema": 1, "kind": "generation", "run": results.name, "repo": str(Path(repo).resolve()),
                "started": started.isoformat(timespec="seconds"), "complete": False,
                "settings": {"concurrency": concurrency, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
                             "sampling": sampling or "greedy"},
                "versions": tool_versions(), "machine": machine_info(),
                "variants": {n: {**variant_record(n, e), "generation": e.get("generation")} for n, e in variants.items()}}
    try:
        with contextlib.ExitStack() as stack:
            if server is None:
                from builder.runtime import start_server

                console.print(f"starting a local Triton server on {repo}")
                server = stack.enter_context(start_server(repo))
            manifest["server"] = server_record(server)
            run_llm_perf(Path(repo), variants, server, concurrency, results, prompt_tokens, output_tokens,
                         perf_analyzer=perf_analyzer, console=console, sampling=sampling)
        manifest["complete"] = True
    finally:
        manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (results / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    console.print(f"results in {results}")
    return results


def write_llm_report(results: Path, frame: pd.DataFrame) -> list[str]:
    """Markdown lines and two plots (TTFT and tokens/s against concurrency) for llm.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["## Text generation", "",
             f"Prompt {int(frame['prompt_tokens'].iloc[0])} tokens, output {int(frame['output_tokens'].iloc[0])} tokens "
             "(forced: max_tokens + ignore_eos), perf_analyzer --streaming over gRPC.", ""]
    rows = [[r.variant, r.concurrency, "failed", "", "", "", "", "", ""] if r.status != "ok" else
            [r.variant, r.concurrency, f"{r.ttft_p50_ms:.0f}", f"{r.ttft_p99_ms:.0f}", f"{r.itl_p50_ms:.1f}",
             f"{r.itl_p99_ms:.1f}", f"{r.tokens_per_s_per_stream:.1f}", f"{r.tokens_per_s:.1f}", f"{r.requests_per_s:.2f}"]
            for r in frame.itertuples()]
    lines += md.table(["variant", "concurrency", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                       "tok/s per stream", "tok/s", "req/s"], rows, right=8)
    ok = frame[frame.status == "ok"]
    for column, label, file in (("ttft_p50_ms", "TTFT p50 (ms)", "llm_ttft.png"), ("tokens_per_s", "output tokens/s (all streams)", "llm_tokens.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, group in ok.groupby("variant"):
            ax.plot(group["concurrency"], group[column], marker="o", label=variant)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / file, dpi=120)
        plt.close(fig)
        lines += ["", f"![{label}]({file})"]
    return lines
