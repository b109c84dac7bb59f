"""Image classifiers (ViT-style): pixel_values in, logits out."""

from __future__ import annotations

from builder.families import Part, Wrapped, register
from builder.signature import TensorSpec


def pixel_input(config, spec) -> TensorSpec:
    size = spec.shapes.image_size or getattr(config, "image_size", 224)
    channels = getattr(config, "num_channels", 3)
    return TensorSpec("pixel_values", "float32", (channels, size, size), kind="pixels")


@register("image-classification")
def image_classification(loaded, spec) -> list[Part]:
    config = loaded.config
    labels = spec.labels or [config.id2label[i] for i in range(config.num_labels)]
    pixels = pixel_input(config, spec)

    def forward(m, pixel_values):
        return [m(pixel_values=pixel_values).logits]

    return [Part("", Wrapped(forward, loaded.module), (pixels,), ("logits",),
                 {"labels": labels, "image_size": pixels.dims[-1]})]
