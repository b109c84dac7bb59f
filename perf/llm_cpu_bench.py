"""The CPU LLM targets, in one run: SmolLM2 served by Triton (perf_analyzer --streaming, c=1 and c=8)
side by side with Hugging Face `generate` in-process (batch 1 and a static batch of 8), same prompt length,
same forced output length, same threads. Also our engine in-process (no Triton, no client), which splits the
served number into engine and serving overhead, and the bf16 variant (weights in bf16; this CPU has avx512_bf16).

    python perf/llm_cpu_bench.py --repo build/llm_bench --spec perf/llm_cpu.yaml --out perf/results/llm-cpu

Targets (fp32): served c=1 >= 0.9x HF batch-1 tokens/s; served c=8 total >= 1.2x HF static batch 8; TTFT p50
<= 150 ms for a 32-token prompt at c=1. HF is timed REPEATS times, the median kept. Writes summary.json and
summary.md into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS, OUTPUT_TOKENS, THREADS, REPEATS = 32, 64, 2, 3


def prompt_ids(repo: Path, model: str) -> list[int]:
    from tokenizers import Tokenizer

    from builder.perf.llm import synthetic_prompt

    text, _ = synthetic_prompt(repo / model / "1" / "tokenizer.json", PROMPT_TOKENS)
    return Tokenizer.from_file(str(repo / model / "1" / "tokenizer.json")).encode(text).ids


def hf_baseline(spec_path: Path, repo: Path, model: str) -> dict:
    import torch

    from builder.generation import load
    from builder.spec import load_spec

    torch.set_num_threads(THREADS)
    spec = load_spec(spec_path)
    src = load(spec_path, next(m for m in spec.models if m.name == model))
    ids = prompt_ids(repo, model)
    out = {"prompt_tokens": len(ids)}
    for batch in (1, 8):
        x = torch.tensor([ids] * batch)
        kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS,
                      do_sample=False, pad_token_id=src.eos[0])
        rates = []
        with torch.inference_mode():
            src.module.generate(x, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                src.module.generate(x, **kwargs)
                rates.append(batch * OUTPUT_TOKENS / (time.perf_counter() - t0))
        out[f"batch{batch}_tokens_per_s"] = statistics.median(rates)
        out[f"batch{batch}_runs"] = [round(r, 1) for r in rates]
    return out


def engine_in_process(repo: Path, name: str, model: str, dtype: str) -> float:
    """Our engine without Triton: 16 requests (prompt 32, output 64) through 8 slots, as perf sends them at c=8."""
    import torch
    from tokenizers import Tokenizer

    from builder.generation import decoder, engine  # the files served beside the model are copies of these

    torch.set_num_threads(THREADS)
    dec = decoder.load(repo / name / "1", dtype=getattr(torch, dtype))
    eng = engine.Engine(dec, Tokenizer.from_file(str(repo / name / "1" / "tokenizer.json")), max_sequences=8,
                        max_total_tokens=1024, prefill_chunk=64)
    ids = prompt_ids(repo, model)
    engine.generate(eng, [ids] * 2, 4, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate(eng, [ids] * 16, OUTPUT_TOKENS, ignore_eos=True)
    return 16 * OUTPUT_TOKENS / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("build/llm_bench"))
    parser.add_argument("--spec", type=Path, default=Path("perf/llm_cpu.yaml"))
    parser.add_argument("--model", default="smollm")
    parser.add_argument("--out", type=Path, default=Path("perf/results/llm-cpu"))
    args = parser.parse_args()
    tb = str(Path(sys.executable).parent / "triton-builder")
    if not (args.repo / args.model).is_dir():
        subprocess.run([tb, "build", str(args.spec), "-o", str(args.repo)], check=True)
    shutil.rmtree(args.out, ignore_errors=True)
    hf = hf_baseline(args.spec, args.repo, args.model)
    print(f"HF generate in-process: {hf}", flush=True)
    names = {"fp32": args.model, "bf16": f"{args.model}_torch_bf16"}
    names = {p: n for p, n in names.items() if (args.repo / n).is_dir()}
    engine = {p: engine_in_process(args.repo, n, args.model, {"fp32": "float32", "bf16": "bfloat16"}[p])
              for p, n in names.items()}
    print(f"engine in-process, 8 slots: {engine}", flush=True)
    chosen = [flag for name in names.values() for flag in ("--model", name)]
    subprocess.run([tb, "perf", str(args.repo), *chosen, "--concurrency", "1,8", "--prompt-tokens",
                    str(PROMPT_TOKENS), "--output-tokens", str(OUTPUT_TOKENS), "--out", str(args.out)], check=True)
    import pandas as pd

    served = pd.read_csv(args.out / "llm.csv").set_index(["precision", "concurrency"])
    c1, c8 = served.loc[("fp32", 1)], served.loc[("fp32", 8)]
    summary = {
        "hf": hf, "engine_in_process_8_slots_tokens_per_s": engine,
        "served_c1_tokens_per_s": float(c1["tokens_per_s_per_stream"]),
        "served_c8_tokens_per_s": float(c8["tokens_per_s"]), "served_c1_ttft_p50_ms": float(c1["ttft_p50_ms"]),
        "ratio_c1": float(c1["tokens_per_s_per_stream"]) / hf["batch1_tokens_per_s"],
        "ratio_c8": float(c8["tokens_per_s"]) / hf["batch8_tokens_per_s"],
    }
    summary["targets"] = {"c1 >= 0.9x HF batch 1": summary["ratio_c1"] >= 0.9,
                          "c8 >= 1.2x HF batch 8": summary["ratio_c8"] >= 1.2,
                          "TTFT p50 <= 150 ms": summary["served_c1_ttft_p50_ms"] <= 150}
    met = {True: "met", False: "missed"}
    t = summary["targets"]
    lines = ["| measure | HF generate fp32 (in-process) | served fp32 (Triton, streaming) | ratio | target |",
             "|---|---:|---:|---:|---|",
             f"| batch 1 / c=1, tokens/s per stream | {hf['batch1_tokens_per_s']:.1f} | "
             f"{summary['served_c1_tokens_per_s']:.1f} | {summary['ratio_c1']:.2f}x | >= 0.9x: {met[t['c1 >= 0.9x HF batch 1']]} |",
             f"| batch 8 / c=8, tokens/s in all | {hf['batch8_tokens_per_s']:.1f} | {summary['served_c8_tokens_per_s']:.1f} | "
             f"{summary['ratio_c8']:.2f}x | >= 1.2x: {met[t['c8 >= 1.2x HF batch 8']]} |",
             f"| TTFT p50 at c=1, {hf['prompt_tokens']}-token prompt | | {summary['served_c1_ttft_p50_ms']:.0f} ms | | "
             f"<= 150 ms: {met[t['TTFT p50 <= 150 ms']]} |", "",
             "| variant | engine in-process, 8 slots, tok/s | served c=1 tok/s | served c=8 tok/s | c=8 vs HF fp32 batch 8 |",
             "|---|---:|---:|---:|---:|"]
    for p in names:
        rate1 = float(served.loc[(p, 1)]["tokens_per_s_per_stream"])
        rate8 = float(served.loc[(p, 8)]["tokens_per_s"])
        summary[f"served_{p}"] = {"c1": rate1, "c8": rate8}
        lines.append(f"| {p} | {engine[p]:.1f} | {rate1:.1f} | {rate8:.1f} | {rate8 / hf['batch8_tokens_per_s']:.2f}x |")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
