"""Decoding rows' attention over a paged KV cache, two ways, at a Llama-3.1-8B layer's shape (32 query heads, 8 KV
heads, head_dim 128, bf16): gathering each row's blocks into one copy then SDPA (Decoder._gather, the CPU's way),
and torch's varlen_attn (FlashAttention) reading the blocks in place through the block table
(Decoder._attend_paged). For each block size: whether varlen_attn takes it, the largest difference from the gather,
and the time of one layer's attention per rows x cached positions (CUDA events, the mean of 20 after 3).

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


def paged(q, k_pool, v_pool, table, positions):
    from torch.nn.attention.varlen import varlen_attn

    rows = q.shape[0]
    used = (positions + 1).to(torch.int32)
    cu_k = F.pad(used.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(rows + 1, dtype=torch.int32, device=q.device)
    return varlen_attn(q, k_pool, v_pool, cu_q, cu_k, 1, table.shape[1] * k_pool.shape[1], enable_gqa=True,
                       seqused_k=used, block_table=table.to(torch.int32))


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


def probe(block: int, rows: int, length: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(block * 7 + rows + length)
    width = -(-length // block)
    blocks = rows * width + 1
    pool = lambda: torch.randn(blocks, block, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    k_pool, v_pool = pool(), pool()
    table = torch.randperm(blocks - 1, device="cuda", generator=g)[:rows * width].view(rows, width)
    positions = torch.randint(length // 2, length, (rows,), device="cuda", generator=g)
    q = torch.randn(rows, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    out = {"block": block, "rows": rows, "length": length, "gather_ms": timed(gathered, q, k_pool, v_pool, table, positions)}
    try:
        diff = (paged(q, k_pool, v_pool, table, positions).float() - gathered(q, k_pool, v_pool, table, positions).float())
        out |= {"max_abs_diff": round(float(diff.abs().max()), 5), "paged_ms": timed(paged, q, k_pool, v_pool, table, positions)}
        graph = torch.cuda.CUDAGraph()  # what a captured decode step does with it
        with torch.cuda.graph(graph):
            captured = paged(q, k_pool, v_pool, table, positions)
        graph.replay()
        torch.cuda.synchronize()
        out["graph_equal"] = bool(torch.equal(captured, paged(q, k_pool, v_pool, table, positions)))
    except Exception as exc:  # noqa: BLE001 - what this torch's kernel refuses is the finding
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "results": []}
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
        report["varlen_block_table"] = "block_table" in inspect.signature(varlen_attn).parameters
    except ImportError as exc:
        report["varlen_block_table"] = f"no varlen_attn: {exc}"
    for block in (16, 256):
        for rows, length in ((1, 256), (64, 256), (256, 256), (32, 8192)):
            r = probe(block, rows, length)
            print(json.dumps(r), flush=True)
            report["results"].append(r)
            (args.out / "paged_probe.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
