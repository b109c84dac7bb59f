"""Where a served LLM step's time goes on the GPU, without inductor (quick: no compile): a Llama-3.2-1B-shaped
decoder with random weights (no transformers), CUDA graphs, 32 slots, keys up to 256.

- decode steps of 1 and 32 rows; a 128-token prompt alone; 31 / 30 decoding rows with one / two 128-token
  prompts, each as a mixed step (prompt rows attend over their own chunk) and as before session 5 (every row
  gathers its slot's cache, logits for every row). Measured on the H100: docs/PERFORMANCE.md, LLM run 3.

    python perf/gpu/mixed_probe.py     (on the GPU machine, from the repository root)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from builder.generation.decoder import Decoder, DecoderConfig  # noqa: E402

SLOTS, LENGTH, PROMPT = 32, 256, 128


def model(layers: int = 16) -> Decoder:
    c = DecoderConfig(vocab_size=128256, hidden_size=2048, num_layers=layers, num_heads=32, num_kv_heads=8,
                      head_dim=64, intermediate_size=8192, rms_norm_eps=1e-5)
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *shape: (torch.randn(*shape, device="cuda", generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    w = {"embed": r(c.vocab_size, c.hidden_size), "norm": torch.ones(c.hidden_size, device="cuda", dtype=torch.bfloat16),
         "inv_freq": 1.0 / (500000.0 ** (torch.arange(0, 64, 2, device="cuda").float() / 64))}
    for i in range(layers):
        p = f"layers.{i}."
        w |= {p + "in_norm": torch.ones(2048, device="cuda", dtype=torch.bfloat16), p + "post_norm": torch.ones(
            2048, device="cuda", dtype=torch.bfloat16), p + "qkv.weight": r(3072, 2048), p + "o.weight": r(2048, 2048),
            p + "gate_up.weight": r(16384, 2048), p + "down.weight": r(2048, 8192)}
    dec = Decoder(c, w)
    dec.allocate(SLOTS, 512)
    return dec


def graphed(fn, *args):
    """fn(*args) captured as a CUDA graph; returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph.replay


def ms(replay, n: int = 50) -> float:
    for _ in range(5):
        replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        replay()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / n * 1e3, 3)


def case(decoding: int, prompts: int):
    """(tokens, slots, positions, length, decoding, picks) of a step with decoding rows then whole prompts."""
    slots = list(range(decoding)) + [s for s in range(decoding, decoding + prompts) for _ in range(PROMPT)]
    positions = [LENGTH - 1] * decoding + list(range(PROMPT)) * prompts
    picks = list(range(decoding)) + [decoding + (i + 1) * PROMPT - 1 for i in range(prompts)]
    t = lambda v: torch.tensor(v, device="cuda")  # noqa: E731
    return (torch.randint(1000, 20000, (len(slots),), device="cuda"), t(slots), t(positions), LENGTH,
            t([decoding]), t(picks + [0] * (SLOTS - len(picks))))


def main() -> None:
    dec = model()
    out = {}
    for name, (d, p) in {"b1": (1, 0), "b32": (32, 0), "prompt128": (0, 1), "b31+1x128": (31, 1),
                         "b30+2x128": (30, 2)}.items():
        tokens, slots, positions, length, decoding, picks = case(d, p)
        if p:
            out[f"{name} mixed"] = ms(graphed(dec.decode, tokens, slots, positions, length, decoding, picks))
        out[f"{name} per-row"] = ms(graphed(dec.decode, tokens, slots, positions, length))  # before session 5
        print(name, {k: v for k, v in out.items() if k.startswith(name + " ")}, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
