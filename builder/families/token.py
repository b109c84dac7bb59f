"""Token classification (named entities, part of speech): one label per token. The worked example of a new
family in docs/EXTENDING.md."""

from __future__ import annotations

from builder.families.base import Part, Wrapped, accepts, register, token_inputs


@register("token-classification", auto="AutoModelForTokenClassification")
def token_classification(loaded, spec) -> list[Part]:
    model, config = loaded.module, loaded.config
    max_len = min(spec.shapes.max_sequence_length, getattr(config, "max_position_embeddings", 10**9))
    with_types = accepts(model, "token_type_ids") and getattr(config, "type_vocab_size", 0) > 0
    inputs = token_inputs(config.vocab_size, max_len, min(spec.shapes.sequence_length, max_len), with_types)
    names = [t.name for t in inputs]

    def forward(m, *args):  # [batch, tokens] ids in, [batch, tokens, labels] logits out
        return [m(**dict(zip(names, args))).logits]

    labels = spec.labels or [config.id2label[i] for i in range(config.num_labels)]
    return [Part("", Wrapped(forward, model), inputs, ("logits",), {"labels": labels})]
