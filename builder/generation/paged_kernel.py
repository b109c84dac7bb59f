"""Attention of decoding rows read straight from the paged KV cache: a Triton kernel (GPU; on the CPU it runs
in Triton's interpreter, for tests only).

Copied beside the served model (like decoder.py) and imported only where the decoder runs on a GPU with a paged
cache (`Decoder.use_paged_kernel`). The gather it replaces copied every row's blocks out of the pool before SDPA
read them again, and every row of a step read up to the step's longest position; this kernel reads each row's
own blocks once, up to its own length. FlashInfer and FlexAttention were the maintained candidates. FlexAttention
over the pool (each row's table as its BlockMask) was 3-7x slower than this kernel and than the gather on the H100
with torch 2.11 (docs/PERFORMANCE.md, 8B shape). FlashInfer was not tried (its kernels are built at run time or come
in packages far over what reaches the GPU machine, see there).

Flash-decoding: each row's keys are cut into `splits` chunks read by separate programs, each keeping a running
softmax over tiles of TILE positions; a second kernel merges the chunks by their log-sum-exp. A program handles
one kv head and all the query heads that share it (grouped-query attention), so keys and values are read once
per kv head. With one chunk the first kernel writes the result itself.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

TILE = 64  # cache positions per step of a program's loop


@triton.jit
def _chunk(q, k, v, tables, slots, lengths, out, part, lse, scale, chunk,
           q_row, q_head, table_row, token, out_row, part_row, part_head, lse_row, lse_head,
           GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
           TILE: tl.constexpr, ONE_SPLIT: tl.constexpr, FP32: tl.constexpr):
    row, kv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots + row)
    length = tl.load(lengths + row)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    g, d = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
    heads = kv * GROUP + g
    in_d = d[None, :] < D
    qt = tl.load(q + row * q_row + heads[:, None] * q_head + d[None, :], mask=(g[:, None] < GROUP) & in_d, other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for t in range(start, end, TILE):
        pos = t + tl.arange(0, TILE)
        valid = pos < end
        block = tl.load(tables + slot * table_row + pos // BLOCK, mask=valid, other=0)
        at = (block * BLOCK + pos % BLOCK)[:, None] * token + kv * D + d[None, :]
        kt = tl.load(k + at, mask=valid[:, None] & in_d, other=0.0)
        vt = tl.load(v + at, mask=valid[:, None] & in_d, other=0.0)
        if FP32:
            s = tl.dot(qt, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(qt, tl.trans(kt))
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        top = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - top)
        p = tl.exp(s - top[:, None])
        total = total * alpha + tl.sum(p, 1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m = top
    keep = (g[:, None] < GROUP) & in_d
    o = acc / tl.where(total > 0, total, 1.0)[:, None]  # nothing to read (length 0: padding, prompt rows): zeros
    if ONE_SPLIT:
        tl.store(out + row * out_row + heads[:, None] * D + d[None, :], o.to(out.dtype.element_ty), mask=keep)
    else:
        tl.store(part + row * part_row + heads[:, None] * part_head + split * D_PAD + d[None, :], o, mask=keep)
        tl.store(lse + row * lse_row + heads * lse_head + split, m + tl.log(tl.where(total > 0, total, 1.0)),
                 mask=g < GROUP)  # a chunk with no keys: -inf


@triton.jit
def _merge(part, lse, out, splits, part_row, part_head, lse_row, lse_head, out_row,
           D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    s, d = tl.arange(0, S_PAD), tl.arange(0, D_PAD)
    weights = tl.load(lse + row * lse_row + head * lse_head + s, mask=s < splits, other=float("-inf"))
    top = tl.max(weights, 0)
    w = tl.exp(weights - tl.where(top == float("-inf"), 0.0, top))  # a chunk with no keys has weight 0
    acc = tl.load(part + row * part_row + head * part_head + s[:, None] * D_PAD + d[None, :],
                  mask=(s[:, None] < splits) & (d[None, :] < D), other=0.0)
    total = tl.sum(w, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + row * out_row + head * D + d, o.to(out.dtype.element_ty), mask=d < D)


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs that keep the device busy: two per streaming multiprocessor (8 in the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _attend(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, slots: torch.Tensor,
            lengths: torch.Tensor, length: int) -> torch.Tensor:
    """Each row's query heads over its first `lengths[row]` cached positions (its own keys written already).

    q: [rows, heads, head_dim]; k_pool, v_pool: [blocks, block_size, kv_heads, head_dim]; tables: [slots, width]
    block ids; slots, lengths: [rows] (a length of 0 gives zeros); length: the most positions any row reads,
    a Python int fixed per CUDA graph (it sets the chunks, so a captured launch's grid stays valid).
    Returns [rows, heads * head_dim] in q's dtype."""
    rows, heads, dim = q.shape
    kv_heads, block = k_pool.shape[2], k_pool.shape[1]
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty(rows, heads * dim, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    tiles = triton.cdiv(max(length, 1), TILE)
    splits = max(1, min(tiles, triton.cdiv(_programs(q.device), rows * kv_heads)))
    chunk = triton.cdiv(tiles, splits) * TILE
    splits = triton.cdiv(tiles * TILE, chunk)
    d_pad, g_pad = max(16, triton.next_power_of_2(dim)), max(16, triton.next_power_of_2(group))  # tl.dot: >= 16
    # each chunk's output and log-sum-exp, for the merge; with one chunk unused (`out` stands in)
    part = torch.empty(rows, heads, splits, d_pad, dtype=torch.float32, device=q.device) if splits > 1 else out
    lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=q.device) if splits > 1 else out
    _chunk[(rows, kv_heads, splits)](
        q, k_pool, v_pool, tables, slots, lengths, out, part, lse, dim ** -0.5, chunk,
        q.stride(0), q.stride(1), tables.stride(0), kv_heads * dim, out.stride(0),
        part.stride(0), part.stride(1), lse.stride(0), lse.stride(1),
        GROUP=group, G_PAD=g_pad, D=dim, D_PAD=d_pad, BLOCK=block, TILE=TILE, ONE_SPLIT=splits == 1,
        FP32=q.dtype == torch.float32)
    if splits > 1:
        _merge[(rows, heads)](part, lse, out, splits, part.stride(0), part.stride(1), lse.stride(0), lse.stride(1),
                              out.stride(0), D=dim, D_PAD=d_pad, S_PAD=triton.next_power_of_2(splits))
    return out


def _fake(q, k_pool, v_pool, tables, slots, lengths, length):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


# An operator of its own, so torch.compile (the served `compile: inductor` step) keeps the launch as it is rather
# than tracing the grid arithmetic over symbolic row counts. A second copy of this file in one process (the package
# and a served model's directory) finds it registered.
try:
    attend = torch.ops.triton_builder.paged_attention
except AttributeError:
    attend = torch.library.custom_op("triton_builder::paged_attention", _attend, mutates_args=())
    attend.register_fake(_fake)
