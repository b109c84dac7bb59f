"""The model's own pre-processing, as data the pre model reads: its fast tokenizer, its image settings."""

from __future__ import annotations

from builder.errors import UserError
from builder.signature import TensorSpec


def serialized_tokenizer(model, tokenizer, max_length: int) -> str:
    """The model's fast tokenizer as tokenizer.json, padding to the longest text and truncating."""
    if tokenizer is None:
        raise UserError(f"models[{model.name}].ensemble: no tokenizer files (tokenizer.json, vocab.txt, ...) in the "
                        f"model's source; a random-init config source has none: use a path source that has them")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"models[{model.name}].ensemble: the tokenizer is not a fast (Rust) tokenizer; "
                        f"save one with tokenizer.json next to the model")
    if tokenizer.pad_token is None:
        raise UserError(f"models[{model.name}].ensemble: the tokenizer has no pad token; batches of texts of "
                        f"different lengths cannot be padded")
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.enable_truncation(max_length, direction=tokenizer.truncation_side)
    backend.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                           pad_type_id=getattr(tokenizer, "pad_token_type_id", 0) or 0, pad_token=tokenizer.pad_token)
    return backend.to_str(pretty=True)


def image_processing(loaded, pixels: TensorSpec) -> dict:
    """Resolved image settings for preprocess.py, and the transformers processor that computes the same.

    From the model's preprocessor_config.json when there is one, else CLIP's defaults (CLIP models) or
    ViT's (others) at the signature's size. A size that differs from the signature's is scaled to it.
    For uint8 pixels (`image_input: uint8`) the settings stop after resize and crop (`output: uint8`): the
    exported model rescales and normalizes (builder.families.vision.pixels_in).
    """
    channels, height, width = pixels.dims[-3:]
    if channels != 3 or height != width or height < 1:
        raise UserError(f"ensemble image pre-processing makes 3 x N x N pixels; the model takes {pixels.dims}")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "requires torchvision, falling back to the PIL backend"
    files = loaded.files_dir
    origin = None
    if files is not None and (files / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(str(files), local_files_only=True)
            origin = "preprocessor_config.json"
        except (OSError, ValueError):
            processor = None
    if origin is None:
        from transformers import CLIPImageProcessor, ViTImageProcessor

        if getattr(loaded.config, "model_type", "") == "clip" or hasattr(loaded.config, "vision_config"):
            processor = CLIPImageProcessor(size={"shortest_edge": height}, crop_size={"height": height, "width": width})
            origin = "transformers CLIPImageProcessor defaults"
        else:
            processor = ViTImageProcessor(size={"height": height, "width": width})
            origin = "transformers ViTImageProcessor defaults"

    def as_dict(size) -> dict | None:
        if size is None:
            return None
        items = size.items() if isinstance(size, dict) else vars(size).items()
        return {k: int(v) for k, v in items if v is not None}

    size = as_dict(processor.size) if getattr(processor, "do_resize", True) else None
    crop = as_dict(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    if size is not None and set(size) not in ({"shortest_edge"}, {"height", "width"}):
        raise UserError(f"image processor size {size} ({origin}) is not supported by the ensemble's image "
                        f"pre-processing; it supports shortest_edge or height/width")
    final = (crop["height"], crop["width"]) if crop else (size["height"], size["width"]) if size and "height" in size else None
    overrides = {}
    if final != (height, width):
        if crop and size and "shortest_edge" in size:
            size = {"shortest_edge": int(round(size["shortest_edge"] * height / crop["height"]))}
        else:
            size = {"height": height, "width": width}
        crop = {"height": height, "width": width} if crop else None
        overrides = {"size": size, **({"crop_size": crop} if crop else {})}
    settings = {
        "origin": origin,
        "resize": size,
        "resample": int(getattr(processor, "resample", 2) or 2),
        "crop": crop,
        "rescale_factor": float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else None,
        "mean": [float(m) for m in processor.image_mean] if getattr(processor, "do_normalize", True) else None,
        "std": [float(s) for s in processor.image_std] if getattr(processor, "do_normalize", True) else None,
    }
    if overrides:
        settings["adjusted"] = f"scaled to the model's {height}x{width} input"
    if pixels.dtype == "uint8":  # image_input: uint8: rescale and normalization run inside the model
        settings.update(rescale_factor=None, mean=None, std=None, output="uint8")
    return {"settings": settings, "processor": processor, "overrides": overrides}
