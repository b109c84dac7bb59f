"""Decoding rows' attention over a paged KV cache, three ways, at a Llama-3.1-8B layer's shape (32 query heads, 8 KV
heads, head_dim 128, bf16), through the decoder's own code: gathering each row's blocks into one copy then SDPA
(Decoder._gather), the Triton kernel reading each row's blocks in place (paged_kernel.py, Decoder.use_paged_kernel:
what the engine uses on a GPU), and FlexAttention (torch.compile'd) over the pool seen as one long sequence with each
row's table as its BlockMask (Decoder.use_flex, _flex_mask). For each block size and rows x cached positions: each
way's largest difference from the gather, whether a CUDA graph replays it, and the time of one layer's attention (CUDA
events, the mean of 20 after 3).

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
    decoding row runs: the gather (`_gather`) unless its `kernel` or `flex` is set."""
    from decoder import Decoder, DecoderConfig

    config = DecoderConfig(vocab_size=1, hidden_size=HEADS * HEAD_DIM, num_layers=1, num_heads=HEADS,
                           num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=1, rms_norm_eps=1e-5)
    dec = Decoder(config, {})
    dec.k_cache, dec.v_cache, dec.tables, dec.block_size = [k_pool], [v_pool], table, k_pool.shape[1]
    return dec


def timed(fn) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        fn()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / 20, 4)


def probe(block: int, rows: int, length: int, flex) -> dict:
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
            return dec._attend_cached(0, q, slots, positions, length)
        finally:
            dec.kernel = None

    def flexed():
        dec.flex = flex
        try:
            return dec._attend_cached(0, q, slots, positions, length, dec._flex_mask(slots, positions))
        finally:
            dec.flex = None

    for name, fn in (("kernel", kernel), ("flex", flexed)):
        try:
            out[f"{name}_max_abs_diff"] = round(float((fn().float() - want).abs().max()), 5)
            out[f"{name}_ms"] = timed(fn)
            graph = torch.cuda.CUDAGraph()  # what a captured decode step does with it
            with torch.cuda.graph(graph):
                captured = fn()
            graph.replay()
            torch.cuda.synchronize()
            out[f"{name}_graph_equal"] = bool(torch.equal(captured, fn()))
        except Exception as exc:  # noqa: BLE001 - what this torch's kernel refuses is the finding
            out[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return out


def main() -> int:
    from torch.nn.attention.flex_attention import flex_attention

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "results": []}
    flex = torch.compile(flex_attention, dynamic=False)
    for block in (16, 64):
        for rows, length in ((1, 256), (64, 256), (256, 256), (32, 8192), (1, 8192)):
            r = probe(block, rows, length, flex)
            print(json.dumps(r), flush=True)
            report["results"].append(r)
            (args.out / "paged_probe.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
