"""Image classifiers (ViT-style): pixel_values in, logits out."""

from __future__ import annotations

from dataclasses import replace

from builder.families.base import Part, Wrapped, register
from builder.signature import TensorSpec


def pixel_input(config, spec) -> TensorSpec:
    size = spec.shapes.image_size or getattr(config, "image_size", 224)
    channels = getattr(config, "num_channels", 3)
    return TensorSpec("pixel_values", spec.image_input, (channels, size, size), kind="pixels")


def pixels_in(part: Part, loaded) -> Part:
    """With `image_input: uint8`, the part takes uint8 pixels [3, H, W] (0-255, resized and cropped) and does
    the image processor's rescale and normalization itself, as one multiply-add per pixel in the model's
    dtype: x * scale / std - mean / std. The constants come from the same settings as the ensemble's
    pre-processing (builder.ensembles.processing.image_processing), so both agree."""
    pixels = part.inputs[0]
    if pixels.dtype != "uint8":
        return part
    import torch

    from builder.ensembles.processing import image_processing

    settings = image_processing(loaded, replace(pixels, dtype="float32"))["settings"]
    rescale = settings["rescale_factor"] or 1.0
    mean, std = settings["mean"] or [0.0] * 3, settings["std"] or [1.0] * 3
    scale = torch.tensor([rescale / s for s in std]).reshape(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).reshape(1, -1, 1, 1)

    class _Pixels(torch.nn.Module):
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped
            self.register_buffer("scale", scale)
            self.register_buffer("shift", shift)

        @property
        def inner(self):  # the Hugging Face model (torch2exported switches its attention to sdpa)
            return self.wrapped.inner

        def forward(self, *args):  # positional, as Wrapped: the exporters' dynamic shapes name forward(*args)
            pixel_values, *rest = args
            return self.wrapped(pixel_values.to(self.scale.dtype) * self.scale + self.shift, *rest)

    normalization = {"rescale_factor": rescale, "mean": mean, "std": std}
    return replace(part, module=_Pixels(part.module).eval(), extra={**part.extra, "pixel_normalization": normalization})


@register("image-classification", auto="AutoModelForImageClassification")
def image_classification(loaded, spec) -> list[Part]:
    config = loaded.config
    labels = spec.labels or [config.id2label[i] for i in range(config.num_labels)]
    pixels = pixel_input(config, spec)

    def forward(m, pixel_values):
        return [m(pixel_values=pixel_values).logits]

    return [pixels_in(Part("", Wrapped(forward, loaded.module), (pixels,), ("logits",),
                           {"labels": labels, "image_size": pixels.dims[-1]}), loaded)]
