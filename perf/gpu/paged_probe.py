"""Decoding rows' attention over a paged KV cache, two ways, at a Llama-3.1-8B layer's shape (32 query heads, 8 KV
heads, head_dim 128, bf16): gathering each row's blocks into one copy then SDPA (Decoder._gather, the CPU's way),
and FlexAttention (torch.compile'd) reading the blocks in place, the pool seen as one long sequence and each row's
table as its BlockMask. For each block size: the largest difference from the gather, whether a CUDA graph replays
it, and the time of one layer's attention per rows x cached positions (CUDA events, the mean of 20 after 3).

    python perf/gpu/paged_probe.py --out DIR    (writes DIR/paged_probe.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def gathered(q, k_pool, v_pool, table, positions):
    """Decoder._gather + _attend_cached: the rows' blocks copied out, masked to each row's own positions."""
    rows, span = q.shape[0], table.shape[1] * k_pool.shape[1]
    keys = k_pool[table].flatten(1, 2).transpose(1, 2)  # [rows, kv, span, d]
    values = v_pool[table].flatten(1, 2).transpose(1, 2)
    qs = q.view(rows, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    mask = (torch.arange(span, device=q.device)[None, :] <= positions[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask).reshape(rows, HEADS, HEAD_DIM)


def flexed(q, k_pool, v_pool, table, positions, flex):
    """Decoder._attend_flex's way: the pool as one long sequence [1, kv_heads, blocks * block, d] (a strided view),
    a BlockMask whose full blocks are the row's table and whose one partial block is masked past its position."""
    from torch.nn.attention.flex_attention import BlockMask

    rows, block = q.shape[0], k_pool.shape[1]
    n = k_pool.shape[0] * block
    k = k_pool.view(1, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = v_pool.view(1, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
    filled = positions + 1
    full = (filled // block).to(torch.int32)
    partial = (filled % block != 0).to(torch.int32)
    last = table.gather(1, (filled // block).clamp(max=table.shape[1] - 1)[:, None]).to(torch.int32)
    limit = positions % block

    def mask(b, h, q_idx, kv_idx):
        return kv_idx % block <= limit[b]

    # the mask's index tensors span every block of the pool (its columns), as flex_attention expects
    cols = lambda t: F.pad(t.to(torch.int32), (0, k_pool.shape[0] - t.shape[1])).view(rows, 1, 1, -1)  # noqa: E731
    bm = BlockMask.from_kv_blocks(partial.view(rows, 1, 1), cols(last), full.view(rows, 1, 1), cols(table),
                                  BLOCK_SIZE=(128, block), mask_mod=mask, seq_lengths=(1, n), compute_q_blocks=False)
    o = flex(q.view(rows, HEADS, 1, HEAD_DIM), k, v, block_mask=bm, enable_gqa=True)
    return o.view(rows, HEADS, HEAD_DIM)


def timed(fn, *args) -> float:
    for _ in range(3):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        fn(*args)
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
    q = torch.randn(rows, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    args = (q, k_pool, v_pool, table, positions)
    out = {"block": block, "rows": rows, "length": length, "gather_ms": timed(gathered, *args)}
    try:
        diff = flexed(*args, flex).float() - gathered(*args).float()
        out |= {"max_abs_diff": round(float(diff.abs().max()), 5), "flex_ms": timed(flexed, *args, flex)}
        graph = torch.cuda.CUDAGraph()  # what a captured decode step does with it
        with torch.cuda.graph(graph):
            captured = flexed(*args, flex)
        graph.replay()
        torch.cuda.synchronize()
        out["graph_equal"] = bool(torch.equal(captured, flexed(*args, flex)))
    except Exception as exc:  # noqa: BLE001 - what this torch's kernel refuses is the finding
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
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
        for rows, length in ((64, 256), (256, 256), (32, 8192)):
            r = probe(block, rows, length, flex)
            print(json.dumps(r), flush=True)
            report["results"].append(r)
            (args.out / "paged_probe.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
