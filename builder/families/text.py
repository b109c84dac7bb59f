"""Text families: encoders (feature-extraction), sequence classifiers and causal LMs (logits only)."""

from __future__ import annotations

from builder.families import Part, Wrapped, accepts, register, token_inputs


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


def sentence_embedding(out, attention_mask):
    """Mean of the token vectors under the mask, L2-normalized (sentence-transformers' recipe)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
    summed = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed, p=2, dim=-1)


@register("feature-extraction")
def feature_extraction(loaded, spec) -> list[Part]:
    available = ["last_hidden_state", "sentence_embedding"]
    if getattr(loaded.module, "pooler", None) is not None:
        available.insert(1, "pooler_output")
    wanted = tuple(spec.outputs or [n for n in available if n != "sentence_embedding"])
    choose(spec, wanted, available)
    part = _text_part(loaded, spec, ("last_hidden_state",), {"pooling": "mean", "normalize": True})
    names = [t.name for t in part.inputs]

    def forward(m, *args):
        feeds = dict(zip(names, args))
        out = m(**feeds)
        extra = {"sentence_embedding": lambda: sentence_embedding(out, feeds["attention_mask"])}
        return [extra[n]() if n in extra else getattr(out, n) for n in wanted]

    return [Part("", Wrapped(forward, loaded.module), part.inputs, wanted, part.extra)]


def choose(spec, wanted, available) -> None:
    from builder.errors import UserError

    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise UserError(f"models[{spec.name}].outputs: {unknown[0]!r} is not an output of {spec.task}; "
                        f"choose from {', '.join(available)}")


@register("text-classification")
def text_classification(loaded, spec) -> list[Part]:
    labels = spec.labels or [loaded.config.id2label[i] for i in range(loaded.config.num_labels)]
    return [_text_part(loaded, spec, ("logits",), {"labels": labels})]


@register("text-generation")
def text_generation(loaded, spec) -> list[Part]:
    # Forward pass only (no KV cache): the LLM serving work adds cached decoding on top of this part.
    def forward(m, input_ids, attention_mask):
        return [m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits]

    part = _text_part(loaded, spec, ("logits",))
    inputs = part.inputs[:2]
    return [Part("", Wrapped(forward, loaded.module), inputs, ("logits",), {})]
