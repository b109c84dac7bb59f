"""Triton python-backend model: raw text and/or encoded images in, a model's input tensors out.

Copied unchanged into `<model>/1/model.py` as an ensemble's first step. Everything it needs comes
from its config and the files beside it, never from code generated per model:

- parameter `inputs` (JSON) says what each TYPE_STRING input carries and how many items one request
  may hold (0: no limit): {"TEXT": {"kind": "text", "max_items": 0}} or, for CLIP,
  {"IMAGE": {"kind": "image", "max_items": 8}, "LABELS": {"kind": "text", "max_items": 8}};
  one item per string, shape [batch, 1] or [batch];
- parameter `kinds` (JSON) maps each output to what it carries: `token_ids`, `attention_mask`,
  `token_type_ids`, `position_ids` (from the text input) or `pixels` (from the image input), as in
  the model's signature;
- text: `1/tokenizer.json`, the model's own fast tokenizer saved by the build with padding to the
  longest text of a batch and truncation at the ensemble's max_length (text longer than that is
  truncated, not refused). All texts of one `execute` call are tokenized in one call;
- images: `1/image_processor.json`, resolved by the build from the model's preprocessor_config.json:
      {"resize": {"shortest_edge": 224} | {"height": 224, "width": 224} | null, "resample": 3,
       "crop": {"height": 224, "width": 224} | null, "rescale_factor": 0.0039 | null,
       "mean": [...] | null, "std": [...] | null, "output": "float32" | "uint8"}
  applied as transformers' PIL image processors do, in their order: decode with Pillow, convert to
  RGB (transparency composited onto white), resize, center crop (zero padding when smaller),
  rescale, normalize, channels first. With "output": "uint8" (the spec's `image_input: uint8`) the
  pixels stay uint8 after the crop (rescale and normalization are inside the model).

Every input of a request is decoded and checked before anything is computed, so a request with no
item, text that is not UTF-8, bytes Pillow cannot decode or too many items gets one error response
(INVALID_ARG) naming the input and item, and nothing downstream runs for it; the other requests are
answered normally. (Checking everything in this one step matters: Triton 2.51 leaks an ensemble's
in-flight request, and can crash later, when one of two parallel branches fails.)

The functions above `TritonPythonModel` need no Triton: the builder runs them in-process to verify
the ensemble, and tests import them.
"""

import io
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backend_common import error_response  # noqa: E402 - beside this file

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by the builder or tests, outside the python backend
    pb_utils = None

TOKEN_KINDS = ("token_ids", "attention_mask", "token_type_ids", "position_ids")


def items_of(array, name, max_items=0, what="string"):
    """The items of a TYPE_STRING tensor of shape [batch, 1] or [batch]; ValueError when unusable."""
    array = np.asarray(array)
    if array.ndim == 2 and array.shape[1] != 1:
        raise ValueError(f"{name} has shape {list(array.shape)}; send one {what} per item: shape [batch, 1]")
    items = array.reshape(-1).tolist()
    if not items:
        raise ValueError(f"{name} is empty; send at least one {what}")
    if max_items and len(items) > max_items:
        raise ValueError(f"{name} has {len(items)} items; at most {max_items} fit in one request")
    return items


def decode_texts(array, name="TEXT", max_items=0):
    """A request's text tensor as a list of str; ValueError naming the bad item."""
    texts = []
    for i, item in enumerate(items_of(array, name, max_items)):
        if isinstance(item, str):
            texts.append(item)
            continue
        try:
            texts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name}[{i}] is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return texts


def decode_images(array, name="IMAGE", max_items=0):
    """A request's image tensor as a list of RGB PIL images; ValueError naming the bad item."""
    from PIL import Image

    images = []
    for i, item in enumerate(items_of(array, name, max_items, "encoded image")):
        data = item.encode("latin-1") if isinstance(item, str) else bytes(item)
        if not data:
            raise ValueError(f"{name}[{i}] is empty; send the bytes of an encoded image (JPEG, PNG, ...)")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
            reason = "unknown format" if type(exc).__name__ == "UnidentifiedImageError" else (
                str(exc).split("\n")[0] or type(exc).__name__)
            raise ValueError(f"{name}[{i}] is not an image Pillow can decode ({reason})") from None
        images.append(to_rgb(image))
    return images


def to_rgb(image):
    """RGB, compositing any transparency onto white (as transformers' convert_to_rgb does)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class TextTokenizer:
    """texts -> {output name: int64 array [n, length]}, padded to the longest text, truncated."""

    def __init__(self, path, kinds):
        from tokenizers import Tokenizer

        unknown = sorted(set(kinds.values()) - set(TOKEN_KINDS))
        if unknown:
            raise ValueError(f"unknown token tensor kind(s) {unknown}; expected some of {list(TOKEN_KINDS)}")
        self.tokenizer = Tokenizer.from_file(str(path))
        if self.tokenizer.padding is None:
            raise ValueError(f"{path}: the tokenizer has no padding set; texts of one batch would differ in length")
        self.kinds = dict(kinds)

    def __call__(self, texts):
        encodings = self.tokenizer.encode_batch(list(texts))
        length = len(encodings[0].ids) if encodings else 0
        fields = {"token_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        out = {}
        for name, kind in self.kinds.items():
            if kind == "position_ids":
                out[name] = np.broadcast_to(np.arange(length, dtype=np.int64), (len(encodings), length)).copy()
            else:
                rows = [getattr(e, fields[kind]) for e in encodings]
                out[name] = np.asarray(rows, dtype=np.int64).reshape(len(encodings), length)
        return out


class ImageProcessor:
    """RGB PIL images -> float32 (or uint8) [n, 3, height, width], following the settings (see the module doc)."""

    def __init__(self, settings):
        self.resize = settings.get("resize")
        self.resample = int(settings.get("resample", 2))
        self.crop = settings.get("crop")
        self.rescale = settings.get("rescale_factor")
        mean, std = settings.get("mean"), settings.get("std")
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
        self.std = None if std is None else np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
        self.output = np.dtype(settings.get("output", "float32"))
        if self.output == np.uint8 and (self.rescale is not None or self.mean is not None):
            raise ValueError("output uint8 goes with rescale_factor, mean and std null (the model normalizes)")
        if self.resize is not None and set(self.resize) not in ({"shortest_edge"}, {"height", "width"}):
            raise ValueError(f"resize {self.resize} must be {{'shortest_edge': n}} or {{'height': h, 'width': w}}")

    def target_size(self, width, height):
        """(height, width) after resizing an image of the given size."""
        if "shortest_edge" in self.resize:
            size = int(self.resize["shortest_edge"])
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = size, int(size * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return int(self.resize["height"]), int(self.resize["width"])

    def one(self, image):
        if self.resize is not None:
            height, width = self.target_size(*image.size)
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image, dtype=np.uint8)  # H, W, C
        if self.crop is not None:
            pixels = center_crop(pixels, int(self.crop["height"]), int(self.crop["width"]))
        if self.output == np.uint8:
            return np.ascontiguousarray(pixels.transpose(2, 0, 1))
        x = pixels.astype(np.float64) * self.rescale if self.rescale is not None else pixels
        x = x.astype(np.float32)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, images):
        return np.stack([self.one(image) for image in images]).astype(self.output, copy=False)


def center_crop(pixels, height, width):
    """The centre height x width of an H, W, C array; zero-padded where the image is smaller."""
    h, w = pixels.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + height, left:left + width]
    canvas = np.zeros((max(h, height), max(w, width), pixels.shape[2]), dtype=pixels.dtype)
    pad_top, pad_left = -(-(canvas.shape[0] - h) // 2), -(-(canvas.shape[1] - w) // 2)  # ceil, as transformers
    canvas[pad_top:pad_top + h, pad_left:pad_left + w] = pixels
    top, left = (canvas.shape[0] - height) // 2, (canvas.shape[1] - width) // 2
    return canvas[top:top + height, left:left + width]


class Preprocessor:
    """Decodes every input of a request, then turns a batch of decoded requests into output arrays."""

    def __init__(self, inputs, kinds, tokenizer_path=None, image_settings=None):
        self.inputs = dict(inputs)
        modalities = [spec["kind"] for spec in self.inputs.values()]
        if sorted(modalities) not in (["text"], ["image"], ["image", "text"]):
            raise ValueError(f"inputs {self.inputs}: expected one text input, one image input, or one of each")
        self.text = next((n for n, s in self.inputs.items() if s["kind"] == "text"), None)
        self.image = next((n for n, s in self.inputs.items() if s["kind"] == "image"), None)
        self.pixels = [name for name, kind in kinds.items() if kind == "pixels"]
        token_kinds = {name: kind for name, kind in kinds.items() if kind != "pixels"}
        if token_kinds and self.text is None or self.pixels and self.image is None:
            raise ValueError(f"outputs {kinds} need a text input for tokens and an image input for pixels")
        self.tokenize = TextTokenizer(tokenizer_path, token_kinds) if token_kinds else None
        self.process = ImageProcessor(image_settings) if self.pixels else None

    def decode(self, arrays):
        """{input: array} of one request -> {input: texts or images}; ValueError for a bad request."""
        out = {}
        for name, spec in self.inputs.items():
            if name not in arrays or arrays[name] is None:
                raise ValueError(f"input {name} is missing")
            decode = decode_texts if spec["kind"] == "text" else decode_images
            out[name] = decode(arrays[name], name, int(spec.get("max_items", 0)))
        return out

    def __call__(self, decoded):
        """Decoded requests -> one {output: array} per request (all texts tokenized in one call)."""
        results = [{} for _ in decoded]
        if self.tokenize is not None:
            texts = [text for request in decoded for text in request[self.text]]
            arrays = self.tokenize(texts)
            start = 0
            for result, request in zip(results, decoded):
                stop = start + len(request[self.text])
                result.update({name: value[start:stop] for name, value in arrays.items()})
                start = stop
        if self.process is not None:
            for result, request in zip(results, decoded):
                pixels = self.process(request[self.image])
                result.update({name: pixels for name in self.pixels})
        return results


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        kinds = json.loads(params["kinds"])
        missing = sorted(set(self.dtypes) - set(kinds))
        if missing:
            raise pb_utils.TritonModelException(f"parameter 'kinds' does not name output(s) {missing}")
        tokenizer = os.path.join(here, params["tokenizer"]) if params.get("tokenizer") else None
        settings = None
        if params.get("image_processor"):
            with open(os.path.join(here, params["image_processor"])) as f:
                settings = json.load(f)
        self.pre = Preprocessor(json.loads(params["inputs"]), {n: kinds[n] for n in self.dtypes}, tokenizer, settings)

    def execute(self, requests):
        decoded, errors = [], {}
        for index, request in enumerate(requests):
            try:
                arrays = {}
                for name in self.pre.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    arrays[name] = None if tensor is None else tensor.as_numpy()
                decoded.append(self.pre.decode(arrays))
            except ValueError as exc:
                errors[index] = str(exc)
        try:
            results = iter(self.pre(decoded))
        except Exception as exc:  # noqa: BLE001 - tokenizer or image failure: every request gets the reason
            message = f"pre-processing failed: {type(exc).__name__}: {exc}"
            return [error_response(errors.get(i, message), "INVALID_ARG" if i in errors else "INTERNAL")
                    for i in range(len(requests))]
        responses = []
        for index in range(len(requests)):
            if index in errors:
                responses.append(error_response(errors[index]))
                continue
            result = next(results)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(result[name].astype(dtype, copy=False)))
                       for name, dtype in self.dtypes.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
