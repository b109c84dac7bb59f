"""CLIP (zero-shot-image-classification): a text tower and an image tower, exported separately.

Two Triton models per variant (`{name}_text_...`, `{name}_image_...`) so each tower batches on its
own and label embeddings can be reused; the similarity (logit scale x cosine) is post-processing.
"""

from __future__ import annotations

from builder.families.base import Part, Wrapped, register, token_inputs
from builder.families.vision import pixel_input, pixels_in


@register("zero-shot-image-classification", auto="AutoModel")
def clip(loaded, spec) -> list[Part]:
    model, config = loaded.module, loaded.config
    tcfg, vcfg = config.text_config, config.vision_config
    max_len = min(spec.shapes.max_sequence_length, tcfg.max_position_embeddings)
    text_inputs = token_inputs(tcfg.vocab_size, max_len, min(spec.shapes.sequence_length, max_len), False)
    # CLIP: softmax over the labels of logit_scale x cosine; SigLIP: a sigmoid of it plus logit_bias
    bias = getattr(model, "logit_bias", None)
    extra = {"logit_scale": float(model.logit_scale.exp().item()), "labels": spec.labels or [],
             "logit_bias": float(bias.item()) if bias is not None else 0.0,
             "activation": "sigmoid" if bias is not None else "softmax"}

    def projected(m, attr: str, pooled):  # SigLIP's towers end in their own heads: no projection layer
        projection = getattr(m, attr, None)
        return projection(pooled) if projection is not None else pooled

    def text(m, input_ids, attention_mask):
        pooled = m.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return [projected(m, "text_projection", pooled)]

    def image(m, pixel_values):
        pooled = m.vision_model(pixel_values=pixel_values).pooler_output
        return [projected(m, "visual_projection", pooled)]

    pixels = pixel_input(vcfg, spec)
    return [
        Part("text", Wrapped(text, model), text_inputs, ("text_embeds",), extra),
        pixels_in(Part("image", Wrapped(image, model), (pixels,), ("image_embeds",),
                       {**extra, "image_size": pixels.dims[-1]}), loaded),
    ]
