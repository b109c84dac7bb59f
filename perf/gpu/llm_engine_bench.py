"""Our generation engine in-process on the GPU, at a model shape with random weights made on the device: what the
served endpoint's engine does (paged KV cache, CUDA graphs, overlapped steps) without Triton, its client or a
build (an 8B build writes 16 GB twice and checks against HF in fp32: more than a bench call has).

Workloads, each a line of the report (tokens/s, TTFT and ITL per request, measured at the engine's emits):
  streams    C streams kept busy (a new request when one ends, as perf_analyzer's concurrency mode does),
             prompt P, output O (forced: ignore_eos), each prompt distinct
  prefix     C streams of a SHARED-token system prompt + a distinct question of P tokens, prefix caching on and
             then off (same weights, a fresh cache): TTFT p50 of both
  long       a LONG-token prompt arriving while C streams decode: their ITL p99 during its prefill vs steady,
             and its TTFT

    python perf/gpu/llm_engine_bench.py --shape 8b --out DIR [--streams 1,64,256] [--prefix 64] [--long 32]
                                        [--quantization int4]  (torchao weight-only; its accuracy against bf16 first)

Shapes: 1b (Llama-3.2-1B: vocab 128256, hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, tied)
and 8b (Llama-3.1-8B: vocab 128256, hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the runtime files as the served model imports them (beside each other, torch only): no builder package needed
sys.path.insert(0, str(HERE.parents[1] / "builder" / "generation"))

SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
               intermediate_size=8192, tied_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
               intermediate_size=14336, tied_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, tied_embeddings=True),  # --smoke: the script's logic on a CPU
}


class Tokens:
    """A stand-in tokenizer: the engine only decodes output ids into text pieces."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def random_decoder(shape: str, device: str, dtype):
    """A Decoder of `shape` with random weights made on the device (norms 1, projections N(0, 0.02))."""
    import torch

    from decoder import Decoder, DecoderConfig

    c = DecoderConfig(rms_norm_eps=1e-5, **SHAPES[shape])
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: (torch.randn(*s, device=device, dtype=dtype, generator=g) * 0.02)  # noqa: E731
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    w = {"embed": rand(c.vocab_size, c.hidden_size) * 50, "norm": torch.ones(c.hidden_size, device=device, dtype=dtype),
         "inv_freq": 1.0 / (500000.0 ** (torch.arange(0, c.head_dim, 2, device=device).float() / c.head_dim))}
    if not c.tied_embeddings:
        w["lm_head"] = rand(c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        w[p + "qkv.weight"] = rand(q + 2 * kv, c.hidden_size)
        w[p + "o.weight"] = rand(c.hidden_size, q)
        w[p + "gate_up.weight"] = rand(2 * c.intermediate_size, c.hidden_size)
        w[p + "down.weight"] = rand(c.hidden_size, c.intermediate_size)
        w[p + "in_norm"] = torch.ones(c.hidden_size, device=device, dtype=dtype)
        w[p + "post_norm"] = torch.ones(c.hidden_size, device=device, dtype=dtype)
    return Decoder(c, w)


def teacher_forced(dec, seqs: list[list[int]]):
    """fp32 logits of every position of each sequence, one sequence at a time through a one-slot cache."""
    import torch

    dec.allocate(1, max(len(s) for s in seqs))
    return [dec(torch.tensor(s, device=dec.device), [(0, 0, len(s))], list(range(len(s)))) for s in seqs]


def accuracy(dec, mode: str, count: int = 8, prompt: int = 64, output: int = 64) -> dict:
    """Quantize `dec` in place (weight-only, torchao) and compare with its own weights before: greedy continuations
    of the unquantized decoder, teacher-forced through both. agreement: the share of positions whose top token is
    the same; nll: the mean negative log-likelihood of those continuations under each."""
    import torch

    import decoder as D
    import engine as E

    prompts = distinct(count, prompt, offset=77)
    e = E.Engine(dec, Tokens(), max_sequences=count, max_total_tokens=prompt + output, prefill_chunk=prompt * count,
                 kv_cache="slots")
    texts = [p + o.token_ids for p, o in zip(prompts, E.generate(e, prompts, output, ignore_eos=True))]
    before = teacher_forced(dec, texts)
    D.quantize(dec, mode)
    after = teacher_forced(dec, texts)
    agree, total, nll = 0, 0, {"before": [], "after": []}
    for text, b, a in zip(texts, before, after):
        b, a = b[prompt - 1:-1], a[prompt - 1:-1]  # the logits that chose each generated token
        target = torch.tensor(text[prompt:], device=b.device)
        agree += int((b.argmax(-1) == a.argmax(-1)).sum())
        total += len(target)
        for name, logits in (("before", b), ("after", a)):
            nll[name].append(float(torch.nn.functional.cross_entropy(logits, target)))
    return {"mode": mode, "sequences": count, "positions": total, "agreement": round(agree / total, 4),
            "nll_bf16": round(statistics.mean(nll["before"]), 4), f"nll_{mode}": round(statistics.mean(nll["after"]), 4)}


def matmul_ms(dec, rows: int, repeats: int = 10) -> float:
    """A step's matmuls alone, every projection and the logits' head over `rows` rows, captured as one CUDA graph
    (the mean of `repeats` replays): the kernels' own time to read the weights, with nothing else a step does."""
    import torch
    import torch.nn.functional as F

    import decoder as D

    names = [n for n in dec.w if n.endswith(D.QUANTIZED)] + ["embed" if dec.config.tied_embeddings else "lm_head"]
    inputs = {dec.w[n].shape[1]: torch.randn(rows, dec.w[n].shape[1], device=dec.device, dtype=dec.dtype) for n in names}
    run = lambda: [F.linear(inputs[dec.w[n].shape[1]], dec.w[n]) for n in names]  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return round(D.graph_ms(graph, repeats), 3)


def make_engine(dec, args, slots: int, prefix_caching: bool = True):
    import torch

    import decoder as D
    import engine as E

    tokens = args.cache_tokens
    if not tokens and args.smoke:
        tokens = slots * args.max_total
    elif not tokens:
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        tokens = dec.cache_tokens(int(free * args.gpu_memory_fraction), args.block_size)
    e = E.Engine(dec, Tokens(), max_sequences=slots, max_total_tokens=args.max_total, prefill_chunk=args.chunk,
                 stream_interval=1, kv_cache=args.kv_cache, block_size=args.block_size,
                 cache_blocks=tokens // args.block_size, prefix_caching=prefix_caching)
    if args.smoke:
        return e, tokens
    step = torch.compile(dec.decode, dynamic=True) if args.compile == "step" else None
    if args.compile == "layers":
        dec.compile_layers()
    if args.attention == "gather":  # allocate_paged turned the kernel on for the GPU
        dec.kernel = None
    q = args.quantization  # as the served model captures them (decoder.py says why for each quantization)
    rows = D.COMPILED_ROWS.get(q)
    graphs = D.Graphs(dec, step, max_rows=slots + args.chunk, min_rows=2 if step and not rows else 1,
                      compiled_rows=rows, compile_mixed=q not in D.UNCOMPILED_MIXED)
    for key in graphs.keys():
        graphs.graphs[key] = graphs.capture(*key)
    e.decode_step, e.graphed_prompts, e.overlap = graphs, True, True
    e.warm()
    return e, tokens


def drive(engine, requests: list[list[int]], concurrency: int, output: int, arrivals=None):
    """Keep `concurrency` requests in flight until all ran; per request: submit time, emit times."""
    import engine as E

    stamps: list[list[float]] = [[] for _ in requests]
    submitted = [0.0] * len(requests)
    pending = list(range(len(requests)))
    done = [0]

    def submit(i):
        submitted[i] = time.perf_counter()

        def emit(out, i=i):
            stamps[i].append(time.perf_counter())
            if out.finished:
                done[0] += 1
                if pending and arrivals is None:
                    submit(pending.pop(0))
        engine.submit(E.Request(requests[i], output, emit=emit, stream=True, ignore_eos=True))

    order = pending if arrivals is None else []
    for _ in range(min(concurrency, len(requests)) if arrivals is None else 0):
        submit(order.pop(0))
    t0 = time.perf_counter()
    later = sorted(arrivals or [], key=lambda a: a[0])  # (after seconds, request index)
    while done[0] < len(requests):
        while later and time.perf_counter() - t0 >= later[0][0]:
            submit(later.pop(0)[1])
        engine.step()
    return submitted, stamps


def stats(submitted, stamps, which=None) -> dict:
    which = range(len(stamps)) if which is None else which
    ttft = [(stamps[i][0] - submitted[i]) * 1e3 for i in which]
    itl = [(b - a) * 1e3 for i in which for a, b in zip(stamps[i], stamps[i][1:])]
    tokens = sum(len(stamps[i]) for i in which)
    wall = max(stamps[i][-1] for i in which) - min(submitted[i] for i in which)
    pct = lambda v, q: round(sorted(v)[min(len(v) - 1, int(q / 100 * len(v)))], 2) if v else None  # noqa: E731
    return {"requests": len(ttft), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99), "tokens_per_s": round(tokens / wall, 1),
            "tokens_per_s_per_stream": round(statistics.mean(len(stamps[i]) / (stamps[i][-1] - submitted[i])
                                                             for i in which), 1)}


VOCAB = [128256]


def check_graphs() -> dict:
    """The tiny shape in fp32 on the GPU, CUDA graphs and overlap as served: the slot cache's greedy tokens, and the
    paged cache's with a roomy pool and with one so small that sequences are preempted between replays."""
    import torch

    import decoder as D
    import engine as E

    VOCAB[0] = SHAPES["tiny"]["vocab_size"]
    dec = random_decoder("tiny", "cuda", torch.float32)
    prompts = distinct(4, 40, offset=1) + [distinct(1, 9, offset=2)[0]]

    def run(kv, blocks=0):
        e = E.Engine(dec, Tokens(), max_sequences=3, max_total_tokens=96, prefill_chunk=5, kv_cache=kv, block_size=8,
                     cache_blocks=blocks)
        e.decode_step, e.graphed_prompts, e.overlap = D.Graphs(dec, length_bucket=16, max_rows=3 + 5), True, True
        return e, [o.token_ids for o in E.generate(e, prompts, 40, ignore_eos=True)]

    _, want = run("slots")
    _, paged = run("paged")
    small, squeezed = run("paged", 14)
    return {"paged_equal": paged == want, "preempted_equal": squeezed == want, "preempted": small.preempted}


def distinct(n: int, length: int, offset: int = 0) -> list[list[int]]:
    """n prompts of `length` ids, different from their first id on (so no prefix is shared by chance)."""
    span = VOCAB[0] - 10
    return [[10 + (offset * 104729 + i * 7919 + j * 31) % span for j in range(length)] for i in range(n)]


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--streams", default="1,64", help="concurrency levels of the streams workload")
    p.add_argument("--requests", type=int, default=2, help="requests per stream at each level")
    p.add_argument("--prefix", type=int, default=0, help="streams of the shared-prefix workload (0: skip)")
    p.add_argument("--shared", type=int, default=2048, help="shared system prompt tokens")
    p.add_argument("--long", type=int, default=0, help="decoding streams of the long-prompt workload (0: skip)")
    p.add_argument("--long-tokens", type=int, default=8192)
    p.add_argument("--max-total", type=int, default=0, help="max_total_tokens (default: what the workloads need)")
    p.add_argument("--chunk", type=int, default=256, help="prefill_chunk: prompt tokens per step")
    p.add_argument("--kv-cache", default="paged")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cache-tokens", type=int, default=0)
    p.add_argument("--gpu-memory-fraction", type=float, default=0.8)
    p.add_argument("--quantization", choices=["none", "int8", "int4"], default="none",
                   help="torchao weight-only quantization of the projections (int4: CUDA only)")
    p.add_argument("--compile", choices=["none", "step", "layers"], default="none",
                   help="inductor before the graphs: over each whole step (minutes of compiling an 8B step) or over "
                        "each layer's elementwise work (Decoder.compile_layers)")
    p.add_argument("--attention", choices=["kernel", "gather"], default="kernel",
                   help="decoding rows over the paged cache: paged_kernel.py's Triton kernel in place (the engine's "
                        "default on a GPU), or the blocks gathered then SDPA")
    p.add_argument("--smoke", action="store_true", help="the tiny shape on the CPU, no graphs: the script's logic")
    args = p.parse_args()
    if args.smoke:
        args.shape = "tiny"
    VOCAB[0] = SHAPES[args.shape]["vocab_size"]
    device = "cpu" if args.smoke else "cuda"
    levels = [int(c) for c in args.streams.split(",") if c]
    need = [args.prompt + args.output]
    if args.prefix:
        need.append(args.shared + args.prompt + args.output)
    long_output = max(args.output, 256)  # the long prompt's streams decode through its whole prefill
    if args.long:
        need.append(args.long_tokens + long_output)
    args.max_total = args.max_total or max(need) + 16
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = lambda s: print(f"[{time.time() - t0:5.0f} s] {s}", flush=True)  # noqa: E731
    dec = random_decoder(args.shape, device, torch.float32 if args.smoke else torch.bfloat16)
    params = sum(v.numel() for v in dec.w.values())
    report = {"shape": args.shape, "parameters": params, "gpu": "cpu" if args.smoke else torch.cuda.get_device_name(),
              "torch": torch.__version__, "args": vars(args) | {"out": str(args.out)}, "results": {}}
    log(f"{args.shape}: {params / 1e9:.2f} B parameters on {report['gpu']}")
    if args.quantization != "none":
        report["accuracy"] = acc = accuracy(dec, args.quantization)
        log(f"{args.quantization} against the unquantized weights: {acc}")

    def save():
        (args.out / "engine.json").write_text(json.dumps(report, indent=1))

    if not args.smoke:
        report["graphs_check"] = check = check_graphs()
        log(f"block tables through CUDA graphs, tokens equal to the slot cache's: {check}")
        VOCAB[0] = SHAPES[args.shape]["vocab_size"]
    slots = max(levels + [args.prefix, args.long + 1])
    engine, tokens = make_engine(dec, args, slots)
    report["cache_tokens"] = tokens
    log(f"engine: {slots} sequences, cache {tokens} tokens in blocks of {args.block_size}, graphs captured "
        f"(compile: {args.compile}, attention: {args.attention})")
    for c in levels:
        reqs = distinct(c * args.requests, args.prompt, offset=c)  # distinct from their first token: no hits
        drive(engine, distinct(c, args.prompt, offset=c + 50000), c, 4)  # warm this level's buckets
        sub, st = drive(engine, reqs, c, args.output)
        report["results"][f"streams c={c}"] = r = stats(sub, st)
        log(f"streams c={c}: {r}")
        save()
    if args.prefix:
        shared = distinct(1, args.shared, offset=99)[0]
        for caching in (True, False):
            engine.blocks.prefix_caching = caching
            reqs = [shared + q for q in distinct(args.prefix * 2, args.prompt, offset=7 + caching)]
            drive(engine, [shared + distinct(1, 8, offset=3)[0]], 1, 2)  # the prefix is cached before the run
            sub, st = drive(engine, reqs, args.prefix, args.output)
            report["results"][f"prefix {args.shared}+{args.prompt} c={args.prefix} caching={caching}"] = r = stats(sub, st)
            log(f"prefix caching={caching}: {r}")
            save()
        engine.blocks.prefix_caching = True
    if args.long:
        output = long_output
        arrivals = [(0.0, i) for i in range(args.long)] + [(1.0, args.long)]  # the long prompt 1 s into the decode
        for run in range(2):  # the first captures the graphs of every cache length on the way (one per 256 tokens)
            # each run's own prompts, so the second's are not cached (ids from distinct(): always below the vocab)
            reqs = distinct(args.long, args.prompt, offset=5 + run) + distinct(1, args.long_tokens, offset=11 + run)
            sub, st = drive(engine, reqs, args.long + 1, output, arrivals)
        arrive, first = sub[args.long], st[args.long][0]
        during = [(b - a) * 1e3 for i in range(args.long) for a, b in zip(st[i], st[i][1:]) if arrive <= b <= first + 0.05]
        steady = [(b - a) * 1e3 for i in range(args.long) for a, b in zip(st[i], st[i][1:]) if b < arrive - 0.1]
        pct = lambda v: round(sorted(v)[int(0.99 * (len(v) - 1))], 2) if v else None  # noqa: E731
        report["results"][f"long {args.long_tokens} with c={args.long}"] = r = {
            "long_ttft_ms": round((first - arrive) * 1e3, 1), "itl_p99_steady_ms": pct(steady),
            "itl_p99_during_ms": pct(during), "itl_p50_steady_ms": round(statistics.median(steady), 2) if steady else None}
        log(f"long prompt: {r}")
        save()
    if not args.smoke:  # the GPU's time per step of every graph the workloads captured (no host in between)
        graphs = engine.decode_step
        graphs.graphs = {k: v for k, v in graphs.graphs.items() if not k[2]}  # decode-only steps
        # padding rows sit at position 0: with the paged kernel a replay reads one cached position a row, so this is
        # the step without its attention reads; beside it, the matmuls alone
        report["replay_ms"] = {f"rows={b} length={n}": round(ms, 3) for (b, n, _), ms in graphs.replay_ms(5).items()}
        report["matmuls_ms"] = {f"rows={b}": matmul_ms(dec, b) for b in sorted({1, *levels})}
        log(f"matmuls alone, ms a step: {report['matmuls_ms']}")
        log("step replay ms: " + ", ".join(f"{k}: {v}" for k, v in report["replay_ms"].items() if k.split()[1] in
                                            ("length=256", "length=512", "length=2304")))
    report["summary"] = engine.summary()
    save()
    log(engine.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
