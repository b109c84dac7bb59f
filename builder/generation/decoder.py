"""A Llama-family decoder with a slot-based KV cache, in plain torch (no transformers).

This file is copied unchanged next to the served model (`<model>/1/decoder.py`), so it imports torch
only. The build converts a Hugging Face causal LM into `DecoderConfig` + a safetensors state dict
(builder/generation/hf2decoder.py) and checks this module against the original token for token.

One `forward` runs a ragged step: any mix of sequences, each with its own new tokens (a prompt chunk
or one decoded token) at its own position, packed along one axis. Projections and the MLP run once
over the packed tokens; the sequences that decode one token (packed first) attend together in one call
over their cache rows up to the longest of them, masked per row; a prompt chunk attends over its own
sequence's filled prefix. The cache holds `slots` sequences of up to `max_len` tokens (plus one scratch
slot for padding rows); new keys and values are written in place.

`decode` is the step where every row is one token at its own (slot, position): tensors in, logits out, no
Python lists, so it can be captured as a CUDA graph (`Graphs`: one per batch bucket and cache-length bucket,
padded rows write into the scratch slot) and compiled by inductor. Prompt chunks fit it too, one row per
token, packed after the decoding rows (a mixed step): a decoding row attends over its slot's cache, a prompt
row over this step's rows of its own sequence (and, for the step's first chunk, the cached prefix), so a
prompt row never gathers a whole cache slot of its own. The engine runs prompt steps that way on a GPU with
graphs (an eager prompt step cost ~15 ms of launches on the H100; a graphed one ~2 ms).

Over the paged cache on a GPU, decoding rows attend through paged_kernel.py's Triton kernel, which reads each
row's own blocks in the pool up to its own position; elsewhere they gather their blocks into one copy first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's queries and keys (Qwen3)
    embed_scale: float = 1.0  # embeddings multiplied by this (Gemma: sqrt(hidden_size))
    attention_scaling: float = 1.0  # rope cos/sin scale (YaRN-style rope types)
    tied_embeddings: bool = True
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "DecoderConfig":
        data = json.loads(text)
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalized in fp32 and cast back, as the reference implementations do."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split layout: x is [tokens, heads, head_dim], cos/sin [tokens, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# A layer's work between its matmuls and attention, in three functions of tensors and constants only, so that
# `Decoder.compile_layers` compiles each once for every layer (the layer's weights are arguments, not guarded
# attributes) and the matmuls stay the kernels they are (cuBLAS, torchao's quantized ones).
def add_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add, then the RMS norm of its result: (x + delta, norm)."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def split_heads(qkv: torch.Tensor, cos, sin, q_norm, k_norm, heads: int, kv_heads: int, head_dim: int, eps: float):
    """The fused projection's output as queries, keys and values [tokens, heads, head_dim], rotated (and each
    head RMS-normed first where q_norm / k_norm are given)."""
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q, k, v = q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def split_heads_into(qkv, cos, sin, q_norm, k_norm, heads: int, kv_heads: int, head_dim: int, eps: float, k_cache,
                     v_cache, where):
    """split_heads, with the keys and values also written into a paged cache (flat views [places, kv_heads,
    head_dim]) at `where`: compiled, the write joins the rotary kernel instead of two indexing kernels of its own."""
    q, k, v = split_heads(qkv, cos, sin, q_norm, k_norm, heads, kv_heads, head_dim, eps)
    k_cache[where] = k
    v_cache[where] = v
    return q, k, v


def gated(gate_up: torch.Tensor, act) -> torch.Tensor:
    """act(gate) * up from the fused gate/up projection's output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


class Decoder(torch.nn.Module):
    """Weights in a flat dict (names as saved by hf2decoder); the cache is allocated by `allocate`."""

    def __init__(self, config: DecoderConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.w = weights
        self.act = ACTIVATIONS[config.activation]
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.norm, self.add_norm, self.split_heads, self.gated = rms_norm, add_norm, split_heads, gated
        self.split_heads_into = split_heads_into
        self.kernel = None  # paged_kernel.attend for decoding rows of the paged cache (use_paged_kernel)

    def use_paged_kernel(self) -> None:
        """Decoding rows of the paged cache attend through paged_kernel.py's Triton kernel, which reads each row's
        own blocks in the pool up to its own length, where `_gather` copies every row's blocks out up to the
        step's longest. `allocate_paged` turns it on for a GPU; on the CPU it runs in Triton's interpreter
        (TRITON_INTERPRET=1, for tests)."""
        try:
            from . import paged_kernel
        except ImportError:  # beside the served model, imported as a top-level module
            import paged_kernel
        self.kernel = paged_kernel.attend

    def compile_layers(self, backend="inductor") -> None:
        """inductor over each layer's elementwise work (norms, rotary, the gated activation, residual adds): four
        small functions compiled once and run by every layer, with dynamic shapes. The matmuls and attention stay
        as they are. Compiling a whole step instead makes inductor trace every layer (minutes for 32 layers) and
        compile the quantized matmuls too (COMPILED_ROWS, UNCOMPILED_MIXED say what that cost)."""
        fuse = lambda f: torch.compile(f, dynamic=True, fullgraph=True, backend=backend)  # noqa: E731
        self.norm, self.add_norm = fuse(rms_norm), fuse(add_norm)
        self.split_heads, self.split_heads_into, self.gated = fuse(split_heads), fuse(split_heads_into), fuse(gated)

    @property
    def device(self) -> torch.device:
        return self.w["embed"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.w["embed"].dtype

    def allocate(self, slots: int, max_len: int) -> None:
        """The KV cache: per layer [slots + 1, kv_heads, max_len, head_dim] for keys and for values (the last
        slot is scratch, for padding rows); and the rotary tables for positions 0..max_len-1."""
        c = self.config
        shape = (slots + 1, c.num_kv_heads, max_len, c.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.block_size, self.tables, self.kernel = 0, None, None  # the paged kernel reads block tables only
        self._rotary(slots, max_len)

    def allocate_paged(self, slots: int, max_len: int, blocks: int, block_size: int) -> None:
        """A paged KV cache: per layer [blocks + 1, block_size, kv_heads, head_dim] for keys and for values (the
        last block is scratch: padding rows write there, unused table entries point there) and a block table per
        sequence slot, [slots + 1, blocks of max_len] on the device (the last row is the scratch slot's). A slot
        is a row of the table, not memory: the engine fills the rows (`set_tables`) from its block manager. Until
        then slot i holds the blocks i * width.. (width: the blocks of max_len) where the pool has them, so the
        decoder alone runs as with slots (the build's checks call it so)."""
        c = self.config
        shape = (blocks + 1, block_size, c.num_kv_heads, c.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.block_size, self.scratch_block = block_size, blocks
        width = -(-max_len // block_size)
        self.tables = torch.full((slots + 1, width), blocks, dtype=torch.long, device=self.device)
        own = min(slots, blocks // width)
        self.tables[:own] = torch.arange(own * width, device=self.device).view(own, width)
        self._rotary(slots, max_len)
        if self.device.type == "cuda":
            self.use_paged_kernel()

    @staticmethod
    def block_bytes(config: DecoderConfig, block_size: int, dtype: torch.dtype) -> int:
        """The memory of one block of the paged cache, keys and values of every layer."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize

    def cache_tokens(self, memory: int, block_size: int) -> int:
        """How many tokens a paged cache of `memory` bytes holds, in whole blocks."""
        return memory // self.block_bytes(self.config, block_size, self.dtype) * block_size

    def set_tables(self, slots: list[int], tables: list[list[int]]) -> None:
        """Rows of the block table (unused entries: the scratch block), copied without waiting for the device:
        the copy is queued behind the steps already launched, before the next one (CUDA graphs read the table
        where it is)."""
        width = self.tables.shape[1]
        rows = [t + [self.scratch_block] * (width - len(t)) for t in tables]
        pinned = self.device.type == "cuda"
        values = torch.tensor(rows, dtype=torch.long, pin_memory=pinned).to(self.device, non_blocking=True)
        index = torch.tensor(slots, dtype=torch.long, pin_memory=pinned).to(self.device, non_blocking=True)
        self.tables.index_copy_(0, index, values)

    def _rotary(self, slots: int, max_len: int) -> None:
        c = self.config
        self.scratch, self.max_len = slots, max_len
        freqs = torch.arange(max_len, device=self.device)[:, None].float() * self.w["inv_freq"][None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * c.attention_scaling).to(self.dtype)
        self.sin = (emb.sin() * c.attention_scaling).to(self.dtype)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _layers(self, tokens: torch.Tensor, positions: torch.Tensor, where, attend) -> torch.Tensor:
        """Embeddings and every layer over packed tokens, then the final norm. Each layer's keys and values are
        written to the cache at `where` (`_where`) before attend(layer, q, k, v) -> [tokens, heads * head_dim]."""
        c = self.config
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        x = F.embedding(tokens, self.w["embed"])
        if c.embed_scale != 1.0:
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)
        eps = c.rms_norm_eps
        norms = lambda p: (self.w[p + "q_norm"], self.w[p + "k_norm"]) if c.qk_norm else (None, None)  # noqa: E731
        flat = lambda t: t.view(-1, c.num_kv_heads, c.head_dim)  # noqa: E731 - a view of a paged cache's places
        h = self.norm(x, self.w["layers.0.in_norm"], eps)
        for i in range(c.num_layers):
            p = f"layers.{i}."
            qkv = self._linear(h, p + "qkv"), cos, sin, *norms(p), c.num_heads, c.num_kv_heads, c.head_dim, eps
            if self.tables is None:
                q, k, v = self.split_heads(*qkv)
                self._write(i, k, v, where)
            else:
                q, k, v = self.split_heads_into(*qkv, flat(self.k_cache[i]), flat(self.v_cache[i]), where)
            x, h = self.add_norm(x, self._linear(attend(i, q, k, v), p + "o"), self.w[p + "post_norm"], eps)
            down = self._linear(self.gated(self._linear(h, p + "gate_up"), self.act), p + "down")
            x, h = self.add_norm(x, down, self.w[f"layers.{i + 1}.in_norm" if i + 1 < c.num_layers else "norm"], eps)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final hidden states, already normed (`_layers`)."""
        head = self.w["embed"] if self.config.tied_embeddings else self.w["lm_head"]
        return F.linear(h, head).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, seqs: list[tuple[int, int, int]], logits_rows: list[int] | None = None):
        """One ragged step.

        tokens: [n] int64, the new tokens of every sequence, packed in the order of `seqs`.
        seqs: (slot, start position, count) per sequence; its tokens go to cache positions start..start+count-1.
            Sequences with count 1 that come first attend together in one call.
        logits_rows: which packed rows get logits (default: the last row of each sequence).
        Returns logits [len(logits_rows), vocab] in fp32.
        """
        positions = torch.cat([torch.arange(start, start + n) for _, start, n in seqs]).to(self.device)
        row_slots = torch.tensor([slot for slot, _, n in seqs for _ in range(n)], device=self.device)
        where = self._where(row_slots, positions)
        ones = next((i for i, (_, _, n) in enumerate(seqs) if n != 1), len(seqs))
        decoding = None
        if ones:
            decoding = (row_slots[:ones], positions[:ones], max(start for _, start, _ in seqs[:ones]) + 1,
                        self._plan(row_slots[:ones], positions[:ones]))

        def attend(layer, q, k, v):
            out = [self._attend_cached(layer, q[:ones], *decoding)] if ones else []
            return torch.cat(out + self._attend_prompts(layer, q, seqs, ones, row_slots))

        x = self._layers(tokens, positions, where, attend)
        if logits_rows is None:
            logits_rows, total = [], 0
            for _, _, n in seqs:
                total += n
                logits_rows.append(total - 1)
        return self._logits(x[logits_rows])

    def decode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, length: int,
               decoding: torch.Tensor | None = None, picks: torch.Tensor | None = None) -> torch.Tensor:
        """Every row is one token at its own (slot, position): tokens, slots, positions [B]; keys up to `length`
        (> every position). Shapes depend on B, `length` and whether `decoding`/`picks` are given only (CUDA
        graphs, inductor); no_grad rather than inference_mode: torch.compile cannot trace inference tensors.

        decoding: None when every row decodes (attends over its slot's cache). Else a [1] tensor D: rows from D on
        are prompt chunks (a row per token), which attend over this step's own rows of their sequence, and the
        first of them (row D) over its sequence's cached prefix too: only the first chunk of a step may continue
        a prompt (Engine._plan). So a prompt row does not gather its sequence's cache as a decoding row does.
        picks: the rows whose logits are wanted (default: every row). Returns logits [len(picks), vocab] in fp32."""
        with torch.no_grad():
            where = self._where(slots, positions)  # once for every layer
            if decoding is None:
                plan = self._plan(slots, positions)

                def attend(layer, q, k, v):
                    return self._attend_cached(layer, q, slots, positions, length, plan)
            else:
                attend = self._mixed(slots, positions, length, decoding)
            x = self._layers(tokens, positions, where, attend)
            return self._logits(x if picks is None else x[picks])

    # -- the cache, slots or pages: where a row's key goes, and a sequence's keys --
    def _where(self, slots: torch.Tensor, positions: torch.Tensor):
        """Where each row's key and value go: (slot, position) in the slot layout; in the paged one the index of
        the token's place among every block's places (its table's block at position // block_size)."""
        if self.tables is None:
            return slots, positions
        b = self.block_size
        return self.tables[slots, positions // b] * b + positions % b

    def _write(self, layer: int, k, v, where) -> None:
        """Rows' keys and values [rows, kv_heads, head_dim] into the slot cache at `where` (`_where`); the paged
        cache is written by `split_heads_into`."""
        slots, positions = where
        self.k_cache[layer][slots, :, positions] = k
        self.v_cache[layer][slots, :, positions] = v

    def _span(self, length: int) -> int:
        """How many cache positions `_gather` returns for `length`: the paged cache reads whole blocks."""
        return length if self.tables is None else -(-length // self.block_size) * self.block_size

    def _gather(self, layer: int, slots: torch.Tensor, length: int):
        """Keys and values of each slot's first `_span(length)` positions: [len(slots), kv_heads, span, head_dim].
        Paged: the table's blocks gathered in one indexing (a view of it transposed, no second copy)."""
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        if self.tables is None:
            return kc[slots, :, :length], vc[slots, :, :length]
        blocks = self.tables[slots, :self._span(length) // self.block_size]  # [B, blocks]
        return kc[blocks].flatten(1, 2).transpose(1, 2), vc[blocks].flatten(1, 2).transpose(1, 2)

    def _attend_cached(self, layer: int, q, slots, positions, length: int, lengths=None) -> torch.Tensor:
        """Every row at once over its slot's first `length` cache entries, masked to the row's own prefix.
        Grouped-query attention by folding each kv head's query heads into the query axis. With the paged kernel,
        each row reads its own blocks up to `lengths` (`_plan`, built once a step) instead."""
        c = self.config
        if self.kernel is not None:
            return self.kernel(q.view(-1, c.num_heads, c.head_dim), self.k_cache[layer], self.v_cache[layer],
                               self.tables, slots, lengths, length)
        keys, values = self._gather(layer, slots, length)  # [B, kv_heads, span, d]
        group = c.num_heads // c.num_kv_heads
        qs = q.view(-1, c.num_kv_heads, group, c.head_dim)
        mask = (torch.arange(keys.shape[2], device=q.device)[None, :] <= positions[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask)
        return o.reshape(q.shape[0], -1)

    def _plan(self, slots, positions, decoding=None):
        """Built once a step for every layer's `_attend_cached`: with the paged kernel, each row's length (0 for
        rows from `decoding` on: prompt rows, whose attention `_mixed` takes from elsewhere); else None."""
        if self.kernel is None:
            return None
        lengths = positions + 1
        if decoding is not None:
            lengths = torch.where(torch.arange(slots.shape[0], device=slots.device) < decoding, lengths, 0)
        return lengths

    def _mixed(self, slots, positions, length: int, decoding: torch.Tensor):
        """attend() for a step of decoding rows then prompt rows (see `decode`). The mask is built once for all
        layers: a prompt row sees the cached prefix (positions before the first chunk's start) if it belongs to
        the first chunk's sequence, and this step's rows of its own sequence up to its own position."""
        c = self.config
        rows = torch.arange(slots.shape[0], device=slots.device)
        first = torch.minimum(decoding, rows[-1:])  # the first prompt row (in a step without one: the last row)
        owner, start = slots[first], positions[first]
        span = self._span(length)
        prefix = (slots[:, None] == owner) & (torch.arange(span, device=slots.device)[None, :] < start)
        own = (slots[:, None] == slots[None, :]) & (positions[None, :] <= positions[:, None])
        group = c.num_heads // c.num_kv_heads
        mask = torch.cat((prefix, own), dim=1).repeat_interleave(group, dim=0)[None, None]  # [1, 1, B*group, L+B]
        prompt_row = (rows >= decoding)[:, None]
        top = self.scratch  # at most one decoding row per cache slot: only the first `top` rows can decode
        plan = self._plan(slots[:top], positions[:top], decoding)

        def attend(layer, q, k, v):
            n = q.shape[0]
            decoded = self._attend_cached(layer, q[:top], slots[:top], positions[:top], length, plan)
            cached_k, cached_v = self._gather(layer, owner, length)
            keys = torch.cat((cached_k, k.transpose(0, 1)[None]), dim=2)  # [1, kv, L+B, d]
            values = torch.cat((cached_v, v.transpose(0, 1)[None]), dim=2)
            qs = q.view(n, c.num_kv_heads, group, c.head_dim).transpose(0, 1).reshape(1, c.num_kv_heads, -1, c.head_dim)
            o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask)  # [1, kv, B*group, d]
            prompted = o[0].view(c.num_kv_heads, n, group, c.head_dim).transpose(0, 1).reshape(n, -1)
            decoded = torch.cat((decoded, prompted[top:]))  # rows past the slots never decode
            return torch.where(prompt_row, prompted, decoded)

        return attend

    def _attend_prompts(self, layer: int, q, seqs, first: int, row_slots) -> list[torch.Tensor]:
        """Sequences from index `first` on, one at a time, over their filled prefix (keys already written)."""
        out, offset = [], first
        for slot, start, n in seqs[first:]:
            end = start + n
            qs = q[offset:offset + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
            keys, values = self._gather(layer, row_slots[offset:offset + 1], end)
            keys, values = keys[:, :, :end], values[:, :, :end]
            if n == 1 or start == 0:
                o = F.scaled_dot_product_attention(qs, keys, values, is_causal=n > 1, enable_gqa=True)
            else:  # a later chunk of a prompt: query i sees keys up to start + i
                mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
                o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, enable_gqa=True)
            out.append(o[0].transpose(0, 1).reshape(n, -1))
            offset += n
        return out


def graph_ms(graph, repeats: int = 10) -> float:
    """A captured CUDA graph's replay in ms: the mean of `repeats` after one warm-up, timed with CUDA events."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


class Graphs:
    """Decode steps replayed as CUDA graphs, one per (batch bucket, cache-length bucket, kind), captured on first
    use into one shared memory pool. Rows are padded to the bucket with the scratch slot at position 0; keys are
    read up to the length bucket, so a step reads the filled cache and not all of it. Two kinds: steps where
    every row decodes (buckets up to the slots), and mixed steps of decoding rows then prompt chunks (`decode`'s
    `decoding` and `picks`; buckets above the slots up to `max_rows`), whose logits are only the picked rows'. The logits
    returned are valid until the next call (the engine reads them before its next step).

    `step` is the function captured: the decoder's `decode`, or that function compiled by inductor (without
    inductor's own CUDA graphs: the capture is done here). `compiled_rows`: the largest bucket that captures
    `step`; larger buckets capture the plain `decode` (COMPILED_ROWS says why for int8)."""

    BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

    def __init__(self, decoder: Decoder, step=None, length_bucket: int = 256, max_rows: int | None = None,
                 compiled_rows: int | None = None, min_rows: int = 1, compile_mixed: bool = True):
        """max_rows: the most rows one step replays (default: the cache slots). The engine also feeds prompt
        chunks through the graphs, one row per prompt token (Engine.graphed_prompts): slots + prefill_chunk.
        min_rows: the smallest decode bucket. Dynamo compiles a 1-row step apart from the others (it specializes
        sizes 1), so with every bucket compiled the server uses 2: one compilation less (a minute or more of
        loading on the H100) for ~0.01 ms more per step at one stream (in-process: 1.51 ms at 1 row,
        1.56 at 8). compile_mixed: False captures the plain `decode` for the mixed buckets (UNCOMPILED_MIXED)."""
        self.dec, self.step = decoder, step or decoder.decode
        slots = decoder.scratch
        top = max(max_rows or slots, slots + 1)
        self.decode_batches = sorted({b for b in self.BATCHES if min_rows <= b < slots} | {slots})
        # mixed steps: every bucket above the slots and `picks` of `slots` rows, so one compiled graph (dynamic
        # shapes) serves them all; buckets that reach below the slots or vary `picks` each compiled again
        # (5 compilations instead of 3: the H100 took over 6 minutes to load)
        self.batches = sorted({b for b in self.BATCHES if slots < b < top} | {top})
        self.length_bucket = length_bucket
        self.compiled_rows = compiled_rows
        self.compile_mixed = compile_mixed
        self.pool = None  # one memory pool for every graph, made at the first capture
        self.graphs: dict[tuple[int, int, bool], tuple] = {}

    def bucket(self, rows: int, length: int, mixed: bool = False) -> tuple[int, int, bool]:
        b = next(x for x in (self.batches if mixed else self.decode_batches) if x >= rows)
        return b, min(-(-length // self.length_bucket) * self.length_bucket, self.dec.max_len), mixed

    def keys(self, length: int = 1) -> list[tuple[int, int, bool]]:
        """Every graph at one length bucket: what the server captures when it loads."""
        return [self.bucket(b, length) for b in self.decode_batches] + [self.bucket(b, length, True) for b in self.batches]

    def step_for(self, batch: int, mixed: bool = False):
        """The function a bucket of `batch` rows captures."""
        if mixed and not self.compile_mixed:
            return self.dec.decode
        return self.step if self.compiled_rows is None or batch <= self.compiled_rows else self.dec.decode

    def capture(self, batch: int, length: int, mixed: bool = False) -> tuple:
        dev = self.dec.device
        step = self.step_for(batch, mixed)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # a capture mid-run (a new bucket) starts with nothing in flight: steps launched ahead still read inputs
        # copied from pinned host memory, and an 8B run that captured longer buckets while they were pending hit
        # a device-side index assert that CUDA_LAUNCH_BLOCKING=1 made go away
        torch.cuda.synchronize(dev)
        zeros = lambda n: torch.zeros(n, dtype=torch.long, device=dev)  # noqa: E731
        inputs = [zeros(batch), torch.full((batch,), self.dec.scratch, dtype=torch.long, device=dev), zeros(batch)]
        extra = (zeros(1), zeros(self.dec.scratch)) if mixed else ()  # decoding, picks
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture: kernel selection, inductor's autotuning, allocations
                step(*inputs, length, *extra)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step(*inputs, length, *extra)
        return graph, inputs + list(extra), logits

    def replay_ms(self, repeats: int = 10) -> dict[tuple[int, int, bool], float]:
        """Each captured graph's replay in ms (the mean of `repeats` after one warm-up) on padding inputs (the
        scratch slot at position 0, so no sequence's cache changes): the GPU's time per step of each bucket
        without serving. The server logs it at load, so a bench compares served with in-process for every
        variant without compiling again."""
        out = {}
        for key, (graph, static, _) in sorted(self.graphs.items()):
            for i, buffer in enumerate(static):
                buffer.fill_(self.dec.scratch if i == 1 else 0)  # tokens, slots, positions, [decoding, picks]
            out[key] = graph_ms(graph, repeats)
        return out

    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, length: int,
                 decoding: torch.Tensor | None = None, picks: torch.Tensor | None = None):
        """As `Decoder.decode`; a mixed step (`decoding` given) needs `picks` (at most one row per cache slot)."""
        rows = tokens.shape[0]
        key = self.bucket(rows, length, decoding is not None)
        if key not in self.graphs:
            self.graphs[key] = self.capture(*key)
        graph, static, logits = self.graphs[key]
        pad = key[0] - rows
        values = [F.pad(tokens, (0, pad)), F.pad(slots, (0, pad), value=self.dec.scratch), F.pad(positions, (0, pad))]
        if decoding is not None:
            values += [decoding, F.pad(picks, (0, self.dec.scratch - picks.shape[0]))]  # picks: `slots` rows
        for buffer, value in zip(static, values):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return logits[:rows if decoding is None else picks.shape[0]]


# The most rows a compiled (inductor) step may have, per weight quantization. int8: torchao's weight-only int8
# linear is mm(x, w_int8.to(bf16)) * scale; inductor, compiling with dynamic shapes, fuses that into one
# kernel that is right for a single row and scales with the rows (no tensor cores). Measured on the H100
# (16 layers, served): 1 row 2.1 ms a step (bf16's time; 5.3 ms uncompiled), 32 rows ~73 ms, a 128-token
# prompt ~283 ms: ~2.2 ms per row, where the uncompiled int8 graphs take 5.9 ms for 32 rows and 6.9 ms for a
# 128-token prompt. So only the 1-row bucket is compiled for int8 (docs/PERFORMANCE.md, GPU LLM).
COMPILED_ROWS = {"int8": 1}
# Weight quantizations whose mixed steps (decoding rows and prompt chunks) are captured uncompiled. int4: inductor
# compiling the mixed step around torchao's int4 kernel kept the model loading for over 6 minutes on the H100
# (bf16 and int8 loaded in ~180 s beside it), past the 10 minutes a bench call may take.
UNCOMPILED_MIXED = {"int4"}

QUANTIZED = (".qkv.weight", ".o.weight", ".gate_up.weight", ".down.weight")  # the projections; not embeddings


def quantize(decoder: Decoder, mode: str) -> None:
    """Weight-only quantization of the projections through torchao, in place: int8 (per-row scales) or int4
    (groups of 128, packed for torch's own int4 matmul kernel, CUDA only). Activations stay in the decoder's
    dtype; F.linear dispatches to the quantized tensor's kernel."""
    import warnings

    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig(version=2) if mode == "int8" else \
        Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in [n for n in decoder.w if n.endswith(QUANTIZED)]:
            w = decoder.w[name]
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            linear.weight = torch.nn.Parameter(w, requires_grad=False)
            quantize_(linear, config)
            decoder.w[name] = linear.weight


def load(directory, device: str = "cpu", dtype: torch.dtype | None = None, quantization: str = "none") -> Decoder:
    """A Decoder from `decoder.json` + `weights.safetensors` in `directory`; weight-only int8/int4 if asked."""
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    config = DecoderConfig.from_json((directory / "decoder.json").read_text())
    weights = load_file(str(directory / "weights.safetensors"), device=str(device))
    if dtype is not None:
        weights = {k: (v if k == "inv_freq" else v.to(dtype)) for k, v in weights.items()}
    decoder = Decoder(config, weights)
    if quantization != "none":
        quantize(decoder, quantization)
    return decoder
