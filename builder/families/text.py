"""Text families: encoders (feature-extraction), sequence classifiers and causal LMs (logits only)."""

from __future__ import annotations

from builder.families.base import Part, Wrapped, accepts, register, token_inputs


def _text_part(loaded, spec, outputs: tuple[str, ...], extra: dict | None = None) -> Part:
    model, config = loaded.module, loaded.config
    max_len = min(spec.shapes.max_sequence_length, getattr(config, "max_position_embeddings", 10**9))
    with_types = accepts(model, "token_type_ids") and getattr(config, "type_vocab_size", 0) > 0
    inputs = token_inputs(config.vocab_size, max_len, min(spec.shapes.sequence_length, max_len), with_types)
    names = [t.name for t in inputs]

    def forward(m, *args):
        out = m(**dict(zip(names, args)))
        return [getattr(out, name) for name in outputs]

    return Part("", Wrapped(forward, model), inputs, outputs, extra or {})


POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max"}


def pooling_of(loaded, name: str) -> dict:
    """The sentence embedding's recipe: sentence-transformers' `1_Pooling/config.json` and whether
    `modules.json` ends in Normalize; without those files, mean pooling + L2 normalization."""
    import json

    folder = loaded.files_dir
    if folder is None or not (folder / "modules.json").is_file():
        return {"pooling": "mean", "normalize": True}
    modules = json.loads((folder / "modules.json").read_text())
    pooling_dir = next((m["path"] for m in modules if m.get("type", "").endswith(".Pooling")), None)
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    config = json.loads((folder / pooling_dir / "config.json").read_text()) if pooling_dir else {}
    chosen = [k for k, v in config.items() if k.startswith("pooling_mode_") and v]
    if not chosen:
        return {"pooling": "mean", "normalize": normalize}
    unsupported = [k for k in chosen if k not in POOLING_MODES]
    if len(chosen) > 1 or unsupported:
        from builder.errors import UserError

        raise UserError(f"models[{name}].source: {pooling_dir}/config.json asks for {' + '.join(chosen)}; "
                        "supported: exactly one of cls, mean or max pooling; serve outputs: [last_hidden_state] "
                        "and pool on the client")
    return {"pooling": POOLING_MODES[chosen[0]], "normalize": normalize}


def sentence_embedding(out, attention_mask, pooling: str = "mean", normalize: bool = True):
    """Pooled token vectors (cls, mean or max under the mask), L2-normalized: sentence-transformers' recipe."""
    import torch

    hidden = out.last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        pooled = hidden.masked_fill(attention_mask.unsqueeze(-1) == 0, -1e9).max(1).values
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled


@register("feature-extraction", auto="AutoModel")
def feature_extraction(loaded, spec) -> list[Part]:
    available = ["last_hidden_state", "sentence_embedding"]
    if getattr(loaded.module, "pooler", None) is not None:
        available.insert(1, "pooler_output")
    wanted = tuple(spec.outputs or [n for n in available if n != "sentence_embedding"])
    choose(spec, wanted, available)
    recipe = pooling_of(loaded, spec.name)
    part = _text_part(loaded, spec, ("last_hidden_state",), recipe)
    names = [t.name for t in part.inputs]

    def forward(m, *args):
        feeds = dict(zip(names, args))
        out = m(**feeds)
        extra = {"sentence_embedding": lambda: sentence_embedding(out, feeds["attention_mask"], **recipe)}
        return [extra[n]() if n in extra else getattr(out, n) for n in wanted]

    return [Part("", Wrapped(forward, loaded.module), part.inputs, wanted, part.extra)]


def choose(spec, wanted, available) -> None:
    from builder.errors import UserError

    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise UserError(f"models[{spec.name}].outputs: {unknown[0]!r} is not an output of {spec.task}; "
                        f"choose from {', '.join(available)}")


@register("text-classification", auto="AutoModelForSequenceClassification")
def text_classification(loaded, spec) -> list[Part]:
    labels = spec.labels or [loaded.config.id2label[i] for i in range(loaded.config.num_labels)]
    return [_text_part(loaded, spec, ("logits",), {"labels": labels})]


@register("text-generation", auto="AutoModelForCausalLM")
def text_generation(loaded, spec) -> list[Part]:
    # Forward pass only (no KV cache): the LLM serving work adds cached decoding on top of this part.
    def forward(m, input_ids, attention_mask):
        return [m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits]

    part = _text_part(loaded, spec, ("logits",))
    inputs = part.inputs[:2]
    return [Part("", Wrapped(forward, loaded.module), inputs, ("logits",), {})]
