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


@register("feature-extraction")
def feature_extraction(loaded, spec) -> list[Part]:
    outputs = ("last_hidden_state",)
    if getattr(loaded.module, "pooler", None) is not None:
        outputs += ("pooler_output",)
    return [_text_part(loaded, spec, outputs, {"pooling": "mean", "normalize": True})]


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
