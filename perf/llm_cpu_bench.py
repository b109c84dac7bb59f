"""The CPU targets of issue 9, in one run: SmolLM2 served by Triton (perf_analyzer --streaming, c=1 and c=8)
side by side with Hugging Face `generate` in-process (batch 1 and a static batch of 8), same prompt length,
same forced output length, same threads.

    python perf/llm_cpu_bench.py --repo build/llm_repository --spec examples/llm.yaml --out perf/results/llm-cpu

Targets: served c=1 >= 0.9x HF batch-1 tokens/s; served c=8 total >= 1.2x HF static batch 8; TTFT p50 <= 150 ms
for a 32-token prompt at c=1. Writes summary.json and summary.md into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS, OUTPUT_TOKENS, THREADS = 32, 64, 2


def hf_baseline(spec_path: Path, repo: Path, model: str) -> dict:
    import torch
    from tokenizers import Tokenizer

    from builder.generation import load
    from builder.perf.llm import synthetic_prompt
    from builder.spec import load_spec

    torch.set_num_threads(THREADS)
    spec = load_spec(spec_path)
    src = load(spec_path, next(m for m in spec.models if m.name == model))
    text, _ = synthetic_prompt(repo / model / "1" / "tokenizer.json", PROMPT_TOKENS)
    ids = Tokenizer.from_file(str(repo / model / "1" / "tokenizer.json")).encode(text).ids
    out = {"prompt_tokens": len(ids)}
    for batch in (1, 8):
        x = torch.tensor([ids] * batch)
        kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS,
                      do_sample=False, pad_token_id=src.eos[0])
        with torch.inference_mode():
            src.module.generate(x, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            t0 = time.perf_counter()
            src.module.generate(x, **kwargs)
            seconds = time.perf_counter() - t0
        out[f"batch{batch}_tokens_per_s"] = batch * OUTPUT_TOKENS / seconds
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("build/llm_repository"))
    parser.add_argument("--spec", type=Path, default=Path("examples/llm.yaml"))
    parser.add_argument("--model", default="smollm")
    parser.add_argument("--out", type=Path, default=Path("perf/results/llm-cpu"))
    args = parser.parse_args()
    tb = str(Path(sys.executable).parent / "triton-builder")
    if not (args.repo / args.model).is_dir():
        subprocess.run([tb, "build", str(args.spec), "-o", str(args.repo)], check=True)
    shutil.rmtree(args.out, ignore_errors=True)
    hf = hf_baseline(args.spec, args.repo, args.model)
    print(f"HF generate in-process: {hf}", flush=True)
    subprocess.run([tb, "perf", str(args.repo), "--model", args.model, "--concurrency", "1,8", "--prompt-tokens",
                    str(PROMPT_TOKENS), "--output-tokens", str(OUTPUT_TOKENS), "--out", str(args.out)], check=True)
    import pandas as pd

    served = pd.read_csv(args.out / "llm.csv").set_index("concurrency")
    c1, c8 = served.loc[1], served.loc[8]
    summary = {
        "hf": hf, "served_c1_tokens_per_s": float(c1["tokens_per_s_per_stream"]),
        "served_c8_tokens_per_s": float(c8["tokens_per_s"]), "served_c1_ttft_p50_ms": float(c1["ttft_p50_ms"]),
        "ratio_c1": float(c1["tokens_per_s_per_stream"]) / hf["batch1_tokens_per_s"],
        "ratio_c8": float(c8["tokens_per_s"]) / hf["batch8_tokens_per_s"],
    }
    summary["targets"] = {"c1 >= 0.9x HF batch 1": summary["ratio_c1"] >= 0.9,
                          "c8 >= 1.2x HF batch 8": summary["ratio_c8"] >= 1.2,
                          "TTFT p50 <= 150 ms": summary["served_c1_ttft_p50_ms"] <= 150}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| measure | HF generate (in-process) | served (Triton, streaming) | ratio | target |", "|---|---:|---:|---:|---|",
             f"| batch 1 / c=1, tokens/s per stream | {hf['batch1_tokens_per_s']:.1f} | {summary['served_c1_tokens_per_s']:.1f} | "
             f"{summary['ratio_c1']:.2f}x | >= 0.9x: {'met' if summary['targets']['c1 >= 0.9x HF batch 1'] else 'missed'} |",
             f"| batch 8 / c=8, tokens/s in all | {hf['batch8_tokens_per_s']:.1f} | {summary['served_c8_tokens_per_s']:.1f} | "
             f"{summary['ratio_c8']:.2f}x | >= 1.2x: {'met' if summary['targets']['c8 >= 1.2x HF batch 8'] else 'missed'} |",
             f"| TTFT p50 at c=1, {hf['prompt_tokens']}-token prompt | | {summary['served_c1_ttft_p50_ms']:.0f} ms | | "
             f"<= 150 ms: {'met' if summary['targets']['TTFT p50 <= 150 ms'] else 'missed'} |"]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
