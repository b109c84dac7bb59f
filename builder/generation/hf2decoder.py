"""A Hugging Face causal LM -> DecoderConfig + the flat weights of builder/generation/decoder.py.

Supported: the Llama family as transformers implements it (llama, mistral, qwen2, qwen3, gemma, phi3 and
the models that reuse those classes, SmolLM2 among them). The rotary frequencies are read off the loaded
model's own rotary embedding, so every static rope variant (default, linear, llama3, yarn) comes out as
transformers computes it. Anything else is refused before work with one line saying what is supported.
"""

from __future__ import annotations

from builder.errors import UserError
from builder.generation.decoder import DecoderConfig

# model_type -> what differs from Llama
ARCHITECTURES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma": {"gemma": True},
    "phi3": {"fused": True},  # q|k|v and gate|up stored as one matrix each (docs/EXTENDING.md's example)
}
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def convert(model, eos_token_ids: tuple[int, ...]) -> tuple[DecoderConfig, dict]:
    """(config, weights in fp32) of a loaded transformers *ForCausalLM; UserError for what is not supported."""
    import torch

    cfg = model.config
    kind = cfg.model_type
    if kind not in ARCHITECTURES:
        raise UserError(f"model_type {kind!r} is not supported for generation yet; supported: {supported()} "
                        "(or write generation: false to export logits only)")
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    partial = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    if float(partial or getattr(cfg, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise UserError("partial rotary embeddings (partial_rotary_factor below 1) are not supported yet")
    if rope_type not in STATIC_ROPE:
        raise UserError(f"rope type {rope_type!r} depends on the sequence length; supported: "
                        f"{', '.join(STATIC_ROPE)}")
    extra = ARCHITECTURES[kind]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inner = model.model
    rotary = inner.rotary_emb
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    gemma = extra.get("gemma", False)
    norm = (lambda w: w + 1.0) if gemma else (lambda w: w)  # Gemma scales by (1 + weight)
    weights = {"embed": sd["model.embed_tokens.weight"], "norm": norm(sd["model.norm.weight"]),
               "inv_freq": rotary.inv_freq.detach().float().cpu()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) or "lm_head.weight" not in sd
    if not tied:
        weights["lm_head"] = sd["lm_head.weight"]
    elif "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
        weights["lm_head"], tied = sd["lm_head.weight"], False
    for i in range(cfg.num_hidden_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        if extra.get("fused"):  # already in the decoder's layout: q, k, v rows; gate rows, then up rows
            weights[o + "qkv.weight"] = sd[p + "self_attn.qkv_proj.weight"]
            weights[o + "gate_up.weight"] = sd[p + "mlp.gate_up_proj.weight"]
        else:
            weights[o + "qkv.weight"] = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            weights[o + "gate_up.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        if extra.get("qkv_bias") or p + "self_attn.q_proj.bias" in sd:
            weights[o + "qkv.bias"] = torch.cat([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        weights[o + "o.weight"] = sd[p + "self_attn.o_proj.weight"]
        if p + "self_attn.o_proj.bias" in sd:
            weights[o + "o.bias"] = sd[p + "self_attn.o_proj.bias"]
        if p + "mlp.gate_proj.bias" in sd:
            weights[o + "gate_up.bias"] = torch.cat([sd[p + "mlp.gate_proj.bias"], sd[p + "mlp.up_proj.bias"]])
        weights[o + "down.weight"] = sd[p + "mlp.down_proj.weight"]
        if p + "mlp.down_proj.bias" in sd:
            weights[o + "down.bias"] = sd[p + "mlp.down_proj.bias"]
        weights[o + "in_norm"] = norm(sd[p + "input_layernorm.weight"])
        weights[o + "post_norm"] = norm(sd[p + "post_attention_layernorm.weight"])
        if extra.get("qk_norm"):
            weights[o + "q_norm"] = sd[p + "self_attn.q_norm.weight"]
            weights[o + "k_norm"] = sd[p + "self_attn.k_norm.weight"]
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    config = DecoderConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim, intermediate_size=cfg.intermediate_size, rms_norm_eps=float(cfg.rms_norm_eps),
        activation=act, qkv_bias=o_has(weights, "qkv.bias"), o_bias=o_has(weights, "o.bias"),
        mlp_bias=o_has(weights, "down.bias"), qk_norm=bool(extra.get("qk_norm")),
        embed_scale=float(cfg.hidden_size ** 0.5) if gemma else 1.0,
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)), tied_embeddings=tied,
        eos_token_ids=tuple(eos_token_ids))
    from builder.generation.decoder import ACTIVATIONS

    if act not in ACTIVATIONS:
        raise UserError(f"activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return config, {k: v.contiguous() for k, v in weights.items()}


def o_has(weights: dict, suffix: str) -> bool:
    return "layers.0." + suffix in weights


def window_limit(model) -> int | None:
    """A sliding attention window (Mistral): sequences longer than it would need windowed attention."""
    window = getattr(model.config, "sliding_window", None)
    return int(window) if window and getattr(model.config, "use_sliding_window", True) else None
