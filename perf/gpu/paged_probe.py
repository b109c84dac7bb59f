"""Decoding rows' attention over a paged KV cache, two ways, at a Llama-3.1-8B layer's shape (32 query heads, 8 KV
heads, head_dim 128, bf16), through the decoder's own code: gathering each row's blocks into one copy then SDPA
(Decoder._gather), and the Triton kernel reading each row's blocks in place (paged_kernel.py,
Decoder.use_paged_kernel: what the engine uses on a GPU). For each block size and rows x cached positions: the
kernel's largest difference from the gather, whether a CUDA graph replays it, and the time of one layer's attention
(CUDA events over replays of it captured as a CUDA graph: the GPU's time).

FlexAttention was the third way (torch.compile'd over the pool seen as one long sequence, each row's table as its
BlockMask); it ran 3-7x slower than both on the H100 (perf/gpu/engine-results-2/probe.log) and was removed.

    python perf/gpu/paged_probe.py --out DIR    (writes DIR/paged_probe.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# the runtime files as the served model imports them (torch only)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "builder" / "generation"))

from paged_kernel import attend  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def layer(k_pool, v_pool, table):
    """One 8B layer's paged cache as the engine holds it: a Decoder (no weights) whose pool is k_pool / v_pool
    [blocks, block, kv_heads, d] and whose block table is `table` (row i: slot i). Its `_attend_cached` is what a
    decoding row runs: the gather (`_gather`) unless its `kernel` is set."""
    from decoder import Decoder, DecoderConfig

    config = DecoderConfig(vocab_size=1, hidden_size=HEADS * HEAD_DIM, num_layers=1, num_heads=HEADS,
                           num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=1, rms_norm_eps=1e-5)
    dec = Decoder(config, {})
    dec.k_cache, dec.v_cache, dec.tables, dec.block_size = [k_pool], [v_pool], table, k_pool.shape[1]
    return dec


def timed(fn) -> float:
    """ms per call of `fn` captured as a CUDA graph (the mean of 20 replays after one): the GPU's time, no launches."""
    from decoder import graph_ms

    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return round(graph_ms(graph, 20), 4)


def probe(block: int, rows: int, length: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(block * 7 + rows + length)
    width = -(-length // block)
    blocks = rows * width + 1
    pool = lambda: torch.randn(blocks, block, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    k_pool, v_pool = pool(), pool()
    table = torch.randperm(blocks - 1, device="cuda", generator=g)[:rows * width].view(rows, width)
    positions = torch.randint(length // 2, length, (rows,), device="cuda", generator=g)
    q = torch.randn(rows, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    dec, slots = layer(k_pool, v_pool, table), torch.arange(rows, device="cuda")
    gathered = lambda: dec._attend_cached(0, q, slots, positions, length)  # noqa: E731
    out = {"block": block, "rows": rows, "length": length, "gather_ms": timed(gathered)}
    want = gathered().float()

    def kernel():
        dec.kernel = attend
        try:
            return dec._attend_cached(0, q, slots, positions, length, dec._plan(slots, positions))
        finally:
            dec.kernel = None

    out["kernel_max_abs_diff"] = round(float((kernel().float() - want).abs().max()), 5)
    out["kernel_ms"] = timed(kernel)
    graph = torch.cuda.CUDAGraph()  # what a captured decode step does with it
    with torch.cuda.graph(graph):
        captured = kernel()
    graph.replay()
    torch.cuda.synchronize()
    out["kernel_graph_equal"] = bool(torch.equal(captured, kernel()))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "results": []}
    for block in (16, 64):
        for rows, length in ((1, 256), (64, 256), (256, 256), (32, 8192), (1, 8192)):
            r = probe(block, rows, length)
            print(json.dumps(r), flush=True)
            report["results"].append(r)
            (args.out / "paged_probe.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
