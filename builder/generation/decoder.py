"""A Llama-family decoder with a slot-based KV cache, in plain torch (no transformers).

This file is copied unchanged next to the served model (`<model>/1/decoder.py`), so it imports torch
only. The build converts a Hugging Face causal LM into `DecoderConfig` + a safetensors state dict
(builder/generation/hf2decoder.py) and checks this module against the original token for token.

One `forward` runs a ragged step: any mix of sequences, each with its own new tokens (a prompt chunk
or one decoded token) at its own position, packed along one axis. Projections and the MLP run once
over the packed tokens; attention runs per sequence over that sequence's filled cache prefix only.
The cache holds `slots` sequences of up to `max_len` tokens; new keys and values are written in place.
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


class Decoder(torch.nn.Module):
    """Weights in a flat dict (names as saved by hf2decoder); the cache is allocated by `allocate`."""

    def __init__(self, config: DecoderConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.w = weights
        self.act = ACTIVATIONS[config.activation]
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        return self.w["embed"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.w["embed"].dtype

    def allocate(self, slots: int, max_len: int) -> None:
        """The KV cache: per layer [slots, kv_heads, max_len, head_dim] for keys and for values."""
        c = self.config
        shape = (slots, c.num_kv_heads, max_len, c.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, seqs: list[tuple[int, int, int]], logits_rows: list[int] | None = None):
        """One ragged step.

        tokens: [n] int64, the new tokens of every sequence, packed in the order of `seqs`.
        seqs: (slot, start position, count) per sequence; its tokens go to cache positions start..start+count-1.
        logits_rows: which packed rows get logits (default: the last row of each sequence).
        Returns logits [len(logits_rows), vocab] in fp32.
        """
        c = self.config
        positions = torch.cat([torch.arange(start, start + n, device=self.device) for _, start, n in seqs])
        freqs = positions[:, None].float() * self.w["inv_freq"][None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * c.attention_scaling).to(self.dtype)[:, None, :]
        sin = (emb.sin() * c.attention_scaling).to(self.dtype)[:, None, :]
        x = F.embedding(tokens, self.w["embed"])
        if c.embed_scale != 1.0:
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)
        for i in range(c.num_layers):
            p = f"layers.{i}."
            h = rms_norm(x, self.w[p + "in_norm"], c.rms_norm_eps)
            qkv = self._linear(h, p + "qkv")
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = q.view(-1, c.num_heads, c.head_dim)
            k = k.view(-1, c.num_kv_heads, c.head_dim)
            v = v.view(-1, c.num_kv_heads, c.head_dim)
            if c.qk_norm:
                q = rms_norm(q, self.w[p + "q_norm"], c.rms_norm_eps)
                k = rms_norm(k, self.w[p + "k_norm"], c.rms_norm_eps)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            x = x + self._linear(self._attend(i, q, k, v, seqs), p + "o")
            h = rms_norm(x, self.w[p + "post_norm"], c.rms_norm_eps)
            gate, up = self._linear(h, p + "gate_up").chunk(2, dim=-1)
            x = x + self._linear(self.act(gate) * up, p + "down")
        if logits_rows is None:
            ends, total = [], 0
            for _, _, n in seqs:
                total += n
                ends.append(total - 1)
            logits_rows = ends
        x = rms_norm(x[logits_rows], self.w["norm"], c.rms_norm_eps)
        head = self.w["embed"] if c.tied_embeddings else self.w["lm_head"]
        return F.linear(x, head).float()

    def _attend(self, layer: int, q, k, v, seqs) -> torch.Tensor:
        """Write k/v into the cache, then attend each sequence's queries over its filled prefix."""
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        out, offset = [], 0
        for slot, start, n in seqs:
            end = start + n
            kc[slot, :, start:end] = k[offset:offset + n].transpose(0, 1)
            vc[slot, :, start:end] = v[offset:offset + n].transpose(0, 1)
            qs = q[offset:offset + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
            keys, values = kc[slot:slot + 1, :, :end], vc[slot:slot + 1, :, :end]
            if n == 1 or start == 0:
                o = F.scaled_dot_product_attention(qs, keys, values, is_causal=n > 1, enable_gqa=True)
            else:  # a later chunk of a prompt: query i sees keys up to start + i
                mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
                o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, enable_gqa=True)
            out.append(o[0].transpose(0, 1).reshape(n, -1))
            offset += n
        return torch.cat(out) if len(out) > 1 else out[0]


def load(directory, device: str = "cpu", dtype: torch.dtype | None = None) -> Decoder:
    """A Decoder from `decoder.json` + `weights.safetensors` in `directory`."""
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    config = DecoderConfig.from_json((directory / "decoder.json").read_text())
    weights = load_file(str(directory / "weights.safetensors"), device=str(device))
    if dtype is not None:
        weights = {k: (v if k == "inv_freq" else v.to(dtype)) for k, v in weights.items()}
    return Decoder(config, weights)
