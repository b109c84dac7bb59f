"""Ensembles: raw text and images in, answers out.

For a model whose spec has an `ensemble:` section, the build adds, next to its verified variants:

- `{name}_pre` (templates/python/preprocess.py): text -> the model's token tensors, with the model's
  own fast tokenizer saved as `1/tokenizer.json` (padding to the longest text, truncation at
  `ensemble.max_length`, default the model's input length limit); and/or encoded images (JPEG, PNG, ...)
  -> pixel_values, with `1/image_processor.json` resolved from the model's preprocessor_config.json
  (else transformers' CLIP / ViT defaults at the signature's image size);
- `{name}_post` (templates/python/postprocess.py): feature-extraction -> EMBEDDING (the model's pooling, 1_Pooling/config.json's cls, mean or max, with
  the attention mask, L2 normalized); classifiers -> PROBABILITIES and LABELS (softmax, top-k, class
  names in `1/labels.json`); CLIP -> PROBABILITIES over the candidate labels;
- the ensemble `{name}` over `ensemble.variant` (default: the first variant that passed) and, with
  `per_variant: true`, `{name}_{tag}_ensemble` for every variant that passed (`{name}_{tag}` is
  already the variant's own name for single-part models). All ensembles of a model share its pre
  and post models.

The python models are ordinary modules copied unchanged; their settings are config `parameters` and
JSON files beside them, written here as data. Every tensor name, dtype and dim of the pre/post
models and of the ensembles' maps is derived from the variants' signatures; steps are wired by
tensor name, and the staged configs go through `check_ensembles` before they are returned.

CLIP. Its ensemble takes IMAGE (encoded images, shape [images]) and LABELS (candidate label strings,
shape [labels]) and returns PROBABILITIES [images, labels] (softmax over the labels of logit_scale x
cosine). The two inputs have unrelated lengths, so no shared batch dimension can carry them: the
CLIP ensemble and its pre/post models use max_batch_size 0 with the batch axis written out as -1.
The towers keep their own max_batch_size and dynamic batching; Triton reads the first axis of the
[images, ...] and [labels, ...] tensors as their batch sizes, so one request holds at most the image
tower's max_batch_size images and the text tower's max_batch_size labels (the pre model says so
in its error). One pre model handles both inputs, so a bad request fails before the ensemble
branches: in Triton 2.51 an error in one of two parallel branches leaks the ensemble's in-flight
request (seen here: the server then waits for them at shutdown and can crash). A single python
"pipeline" model per tower was the alternative; this keeps the towers exactly as verified and
served on their own, and every step visible to Triton's scheduler and metrics.

Verification. At build time the expected answers come from the original PyTorch model with
transformers' own tokenizer / image processor (sentence-transformers' recipe for embeddings,
`logits_per_image` for CLIP), on real inputs: sentences of different lengths (unicode, an empty
string, one longer than max_length), images made with Pillow (sizes, RGB / RGBA / L / P, JPEG /
PNG / GIF). The same inputs go through the pipeline in-process (the python models' own code and
files, the variant's artifact, wired as the ensemble is). The numbers (worst cosine for embeddings,
top-1 agreement and probability difference for classifiers) are the entry's "verification"; the
expected answers are its reference.npz, which builder.runtime.self_check and `check_ensemble_e2e`
compare with what the served ensemble returns. Text and images are stored as fixed-width bytes
(dtype 'S'), which load_reference accepts.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from builder.errors import RunError, UserError, root_reason
from builder.manifest import load_reference, read_manifest, save_reference, signature_of, write_manifest
from builder.render import model_config, render_template
from builder.repository import file_records
from builder.signature import Signature, TensorSpec

PYTHON_MODELS = Path(__file__).resolve().parent.parent / "templates" / "python"
TOKEN_KINDS = {"token_ids", "attention_mask", "token_type_ids", "position_ids"}
PARTS = {"zero-shot-image-classification": ("image", "text")}  # other tasks: one part, suffix ""

# Real inputs for references and end-to-end checks: the first ones matter most (a small
# max_batch_size keeps only a prefix): plain, unicode, empty, longer than any max_length.
E2E_TEXTS = (
    "Triton serves models from a repository on disk.",
    "Ünïcödé text, emoji 🚀, 中文 and Ελληνικά are tokenized too.",
    "",
    " ".join(["The embedding of a sentence is the mean of its token vectors, normalized to unit length."] * 40),
    "Short.",
    "A quick brown fox jumps over the lazy dog while dynamic batching groups requests that arrive together.",
)
CANDIDATE_LABELS = ("a photo of a cat", "a photo of a dog", "a red car", "Ünïcödé 🚀 label")
IMAGE_KINDS = (  # width, height, PIL mode, format
    (64, 48, "RGB", "JPEG"), (32, 32, "RGB", "PNG"), (40, 90, "RGBA", "PNG"),
    (120, 80, "L", "PNG"), (300, 200, "RGB", "JPEG"), (17, 23, "P", "GIF"),
)
# classifiers: the largest probability difference to the fp32 PyTorch answers, per precision
PROBABILITY_ATOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": 5e-2, "int4": 1e-1}
STEP_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # pre/post models: same code, same inputs


# --- the pieces -------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepModel:
    """A python-backend pre/post model this module writes."""

    name: str
    role: str  # preprocess | postprocess
    template: str  # file under templates/python/, copied as 1/model.py
    sig: Signature
    parameters: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # 1/<file> -> text


@dataclass(frozen=True)
class Step:
    model: str
    inputs: dict[str, str]  # model tensor -> ensemble tensor
    outputs: dict[str, str]


@dataclass(frozen=True)
class Plan:
    """What the ensembles of one model are made of; built from the first ensemble variant's signatures."""

    task: str
    sigs: dict[str, Signature]  # part ("" or "image" / "text") -> the variant's signature
    pre: StepModel
    post: StepModel
    inputs: tuple[TensorSpec, ...]  # the ensemble's
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    max_length: int | None
    image: dict | None = None  # resolved image settings, transformers processor and its overrides
    labels: list[str] | None = None


def variant_name(model: str, part: str, tag: str) -> str:
    return f"{model}_{part}_{tag}" if part else f"{model}_{tag}"


def explicit_batch(t: TensorSpec) -> TensorSpec:
    """The same tensor with its batch axis written out (for a max_batch_size 0 model)."""
    return replace(t, dims=(-1, *t.dims), max_dims=(-1, *t.max_dims) if t.max_dims else None,
                   opt_dims=(1, *t.opt_dims) if t.opt_dims else None)


@functools.lru_cache(maxsize=None)
def python_model(template: str):
    """A templates/python module imported as an ordinary module (it needs no Triton outside `execute`)."""
    path = PYTHON_MODELS / template
    spec = importlib.util.spec_from_file_location(f"triton_builder_python_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- planning ---------------------------------------------------------------------------------

def make_plan(model, loaded, tokenizer, sigs: dict[str, Signature]) -> Plan:
    """Pre/post models and the ensemble's I/O for `model`, from its parts' signatures."""
    clip = model.task == "zero-shot-image-classification"
    first = next(iter(sigs.values()))
    mbs = 0 if clip else first.max_batch_size
    lift = (lambda t: explicit_batch(t)) if clip and first.max_batch_size > 0 else (lambda t: t)
    source_dims = (-1,) if clip else ((1,) if mbs > 0 else (-1, 1))
    max_length, image = None, None
    sources, outputs, inputs_param, kinds, files = [], [], {}, {}, {}
    for part, sig in sigs.items():
        max_items = sig.max_batch_size if clip else 0  # CLIP: a request's items are one tower batch
        token_kinds = {t.kind for t in sig.inputs}
        if token_kinds <= TOKEN_KINDS:
            max_length = max_length_of(model, sig)
            source = TensorSpec("LABELS" if clip else "TEXT", "bytes", source_dims, kind="text")
            files["tokenizer.json"] = serialized_tokenizer(model, tokenizer, max_length)
        elif token_kinds == {"pixels"} and len(sig.inputs) == 1:
            image = image_processing(loaded, sig.inputs[0])
            source = TensorSpec("IMAGE", "bytes", source_dims, kind="image")
            files["image_processor.json"] = json.dumps(image["settings"], indent=2) + "\n"
        else:
            raise UserError(f"models[{model.name}].ensemble: inputs {', '.join(t.name for t in sig.inputs)} "
                            f"are neither token tensors nor one pixel tensor; no pre-processing fits them")
        sources.append(source)
        inputs_param[source.name] = {"kind": source.kind, "max_items": max_items}
        outputs += [lift(t) for t in sig.inputs]
        kinds.update({t.name: t.kind for t in sig.inputs})
    params = {"inputs": json.dumps(inputs_param), "kinds": json.dumps(kinds)}
    params.update({key: name for key, name in (("tokenizer", "tokenizer.json"), ("image_processor", "image_processor.json"))
                   if name in files})
    pre = StepModel(f"{model.name}_pre", "preprocess", "preprocess.py", Signature(tuple(sources), tuple(outputs), mbs),
                    params, files)
    post, labels = post_model(model, sigs, mbs, lift)
    return Plan(model.task, dict(sigs), pre, post, tuple(sources), post.sig.outputs, mbs, max_length, image, labels)


def max_length_of(model, sig: Signature) -> int:
    ids = next(t for t in sig.inputs if t.kind == "token_ids")
    limit = ids.max_dims[-1] if ids.max_dims else None
    wanted = model.ensemble.max_length or limit
    if wanted is None:
        raise UserError(f"models[{model.name}].ensemble.max_length: give it (the model's inputs have no length limit)")
    if limit is not None and wanted > limit:
        raise UserError(f"models[{model.name}].ensemble.max_length: {wanted} exceeds the model's input length "
                        f"limit {limit}; lower it (or raise shapes.max_sequence_length)")
    return int(wanted)


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
    return {"settings": settings, "processor": processor, "overrides": overrides}


def post_model(model, sigs: dict[str, Signature], mbs: int, lift) -> tuple[StepModel, list[str] | None]:
    name = f"{model.name}_post"
    batch = (-1,) if mbs == 0 else ()
    if model.task == "zero-shot-image-classification":
        image, text = lift(sigs["image"].outputs[0]), lift(sigs["text"].outputs[0])
        logit_scale = sigs["text"].extra.get("logit_scale")
        if logit_scale is None:
            raise RunError(f"{model.name}: the text tower's signature has no logit_scale")
        outputs = (TensorSpec("PROBABILITIES", "float32", (-1, -1)),)
        params = {"task": "zero-shot", "logit_scale": repr(float(logit_scale)),
                  "logit_bias": repr(float(sigs["text"].extra.get("logit_bias", 0.0))),
                  "activation": sigs["text"].extra.get("activation", "softmax"),
                  "tensors": json.dumps({"image": image.name, "text": text.name, "probabilities": "PROBABILITIES"})}
        return StepModel(name, "postprocess", "postprocess.py", Signature((image, text), outputs, mbs), params), None
    sig = sigs[""]
    first = sig.outputs[0]
    if model.task == "feature-extraction":
        mask = next((t for t in sig.inputs if t.kind == "attention_mask"), None)
        if mask is None or len(first.dims) < 2:
            raise UserError(f"models[{model.name}].ensemble: mean pooling needs token vectors and an attention_mask")
        pooling = sig.extra.get("pooling", "mean")
        outputs = (TensorSpec("EMBEDDING", "float32", (*batch, first.dims[-1])),)
        params = {"task": "embedding", "pooling": pooling, "normalize": "true" if sig.extra.get("normalize", True) else "false",
                  "tensors": json.dumps({"hidden": first.name, "mask": mask.name, "embedding": "EMBEDDING"})}
        return StepModel(name, "postprocess", "postprocess.py", Signature((first, mask), outputs, mbs), params), None
    labels = [str(label) for label in sig.extra.get("labels") or []]
    classes = first.dims[-1]
    if not labels or classes != len(labels):
        raise UserError(f"models[{model.name}]: {len(labels)} label(s) for {classes} classes; give `labels:` "
                        f"with one name per class")
    k = min(model.ensemble.top_k, len(labels))
    outputs = (TensorSpec("PROBABILITIES", "float32", (*batch, k)), TensorSpec("LABELS", "bytes", (*batch, k), kind="text"))
    params = {"task": "classification", "top_k": str(k), "labels": "labels.json",
              "tensors": json.dumps({"logits": first.name, "probabilities": "PROBABILITIES", "labels": "LABELS"})}
    files = {"labels.json": json.dumps(labels, ensure_ascii=False, indent=1) + "\n"}
    return StepModel(name, "postprocess", "postprocess.py", Signature((first,), outputs, mbs), params, files), labels


def wire(plan: Plan, variants: list[tuple[str, Signature]]) -> list[Step]:
    """Steps in order, pre -> variants -> post, each tensor mapped to the ensemble tensor of the same name."""
    chain = [(plan.pre.name, plan.pre.sig)] + variants + [(plan.post.name, plan.post.sig)]
    needed = {t.name for t in plan.outputs}
    steps = []
    for model_name, sig in reversed(chain):  # outputs are mapped only where a later step (or the answer) reads them
        outputs = {t.name: t.name for t in sig.outputs if t.name in needed}
        needed |= {t.name for t in sig.inputs}
        steps.append(Step(model_name, {t.name: t.name for t in sig.inputs}, outputs))
    return steps[::-1]


# --- build ------------------------------------------------------------------------------------

def build_ensembles(model, loaded, tokenizer, entries: dict[str, dict], stage: Path, runtime: str, serving: dict,
                    console) -> dict[str, dict]:
    """Stage `{name}_pre`, `{name}_post` and the ensembles of `model` under `stage/`; return their entries.

    `entries` are the model's variants just built (staged under stage/<name>/). Ensembles whose
    variant did not pass are skipped with a message (the build fails on that variant already);
    an ensemble whose end-to-end numbers miss the tolerance is returned with status "failed".
    """
    t0 = time.time()
    if loaded.config is None:
        raise UserError(f"models[{model.name}].ensemble: needs a Hugging Face model (its tokenizer or image "
                        f"processor files); a factory source has none")
    parts = PARTS.get(model.task, ("",))
    wanted = ensembles_to_build(model, parts, entries, console)
    if not wanted:
        return {}
    console.print(f"  {model.name}: pre/post-processing and {len(wanted)} ensemble(s), checked end to end")
    variant_sigs = {tag: [(variant_name(model.name, p, tag), signature_of(entries[variant_name(model.name, p, tag)]))
                          for p in parts] for tag in dict.fromkeys(wanted.values())}
    plan = make_plan(model, loaded, tokenizer, dict(zip(parts, (s for _, s in next(iter(variant_sigs.values()))))))
    for m in (plan.pre, plan.post):
        write_step_model(stage / m.name, m, runtime, serving)
    inputs = reference_inputs(plan)
    try:
        expected = torch_expected(model, loaded, tokenizer, plan, inputs)
        runs = {}
        for tag, variants in variant_sigs.items():
            steps = wire(plan, variants)
            runs[tag] = (steps, *run_in_process(plan, steps, variants, stage, inputs))
        tensors = next(iter(runs.values()))[2]  # the first ensemble's intermediate tensors: pre/post references
        pre_numbers = pre_check(plan, tokenizer, tensors, inputs)
    except (UserError, RunError):
        raise
    except Exception as exc:
        raise RunError(f"checking the ensemble in-process failed: {root_reason(exc)}") from exc

    common = {"model": model.name, "task": model.task, "source": loaded.description, "built_at": now(),
              "command": next(e["command"] for e in entries.values() if e.get("command")).split("  #")[0]}
    out: dict[str, dict] = {}
    for m, numbers in ((plan.pre, pre_numbers), (plan.post, {"passed": True})):
        save_text_safe(stage / m.name / "reference.npz", {t.name: tensors[t.name] for t in m.sig.inputs},
                       {t.name: tensors[t.name] for t in m.sig.outputs})
        out[m.name] = {"role": m.role, **common, "status": "passed" if numbers["passed"] else "failed",
                       "signature": m.sig.to_dict(), "files": file_records(stage / m.name),
                       "verification": {"tolerance": dict(STEP_TOLERANCE), **numbers}, "reference": "reference.npz",
                       "seconds": round(time.time() - t0, 2)}
    sig = Signature(plan.inputs, plan.outputs, plan.max_batch_size)
    variants_by_tag = {v.tag: v for v in model.variants}
    for name, tag in wanted.items():
        steps, got, _ = runs[tag]
        variant = variants_by_tag[tag]
        verification = compare_answers(got, expected, variant)
        if not pre_numbers["passed"]:
            verification["passed"] = False
            verification["reason"] = "; ".join(r for r in (pre_numbers["reason"], verification["reason"]) if r)
        write_ensemble(stage / name, name, sig, steps)
        save_text_safe(stage / name / "reference.npz", inputs, expected)
        status = "passed" if verification["passed"] else "failed"
        if status == "failed":
            console.print(f"  [red]{name}: end-to-end verification failed: {verification['reason']}[/]")
        out[name] = {"role": "ensemble", **common, "variant": tag, "format": variant.format,
                     "precision": variant.precision, "status": status, "signature": sig.to_dict(),
                     "steps": [s.model for s in steps], "files": file_records(stage / name),
                     "verification": verification, "reference": "reference.npz",
                     "seconds": round(time.time() - t0, 2)}
    problems = check_staged(stage, [*entries, *out])
    if problems:
        raise RunError(f"{model.name}: the ensembles it built are wired wrongly (a triton-builder bug):\n  "
                       + "\n  ".join(problems))
    return out


def ensembles_to_build(model, parts: tuple[str, ...], entries: dict[str, dict], console) -> dict[str, str]:
    """Ensemble name -> variant tag: `{name}` for ensemble.variant (default: the first variant that
    passed) and, with per_variant, `{name}_{tag}_ensemble` for every variant that passed."""
    tags = [v.tag for v in model.variants if v.format != "tensorrt"]  # an engine cannot be run here to check it
    passed = [t for t in tags
              if all(entries.get(variant_name(model.name, p, t), {}).get("status") == "passed" for p in parts)]
    default = model.ensemble.variant or (passed[0] if passed else None)
    wanted: dict[str, str] = {}
    if default in passed:
        wanted[model.name] = default
    else:
        console.print(f"  [red]{model.name}: no ensemble {model.name}: variant {default or '(none)'} did not pass[/]")
    if model.ensemble.per_variant:
        wanted.update({f"{model.name}_{t}_ensemble": t for t in passed})
    return wanted


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def reference_inputs(plan: Plan) -> dict[str, np.ndarray]:
    """Real inputs for the ensemble (as many as one request may carry), as fixed-width bytes arrays."""
    arrays = {}
    limits = json.loads(plan.pre.parameters["inputs"])
    for source in plan.inputs:
        if source.kind == "text":
            items = [t.encode() for t in (CANDIDATE_LABELS if source.name == "LABELS" else E2E_TEXTS)]
        else:
            items = sample_images(len(IMAGE_KINDS))
        items = items[:limits[source.name]["max_items"] or (plan.max_batch_size or None)]
        shape = (len(items), *source.dims[1:]) if plan.max_batch_size == 0 else (len(items), *source.dims)
        arrays[source.name] = np.array(items, dtype=np.bytes_).reshape(shape)
    return arrays


def sample_images(count: int, seed: int = 0) -> list[bytes]:
    """`count` encoded test images made with Pillow: several sizes, modes (RGB, RGBA, L, P) and formats."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        width, height, mode, fmt = IMAGE_KINDS[i % len(IMAGE_KINDS)]
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                         np.full_like(x, int(rng.integers(0, 256)))], axis=-1).astype(np.uint8)
        image = Image.fromarray(base, "RGB")
        draw = ImageDraw.Draw(image)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([width // 5, height // 5, 4 * width // 5, 4 * height // 5], fill=colour)
        draw.rectangle([0, 0, width // 4, height // 4], fill=tuple(255 - c for c in colour))
        if mode == "RGBA":
            image = image.convert("RGBA")
            image.putalpha(Image.fromarray((y * 255 // max(height - 1, 1)).astype(np.uint8), "L"))
        elif mode == "P":
            image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        else:
            image = image.convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buffer.getvalue())
    return out


def torch_expected(model, loaded, tokenizer, plan: Plan, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The answers of the original PyTorch model, with transformers' own tokenizer / image processor."""
    import torch

    sigs = plan.sigs
    texts = {k: [bytes(x).decode() for x in v.reshape(-1).tolist()] for k, v in inputs.items() if k in ("TEXT", "LABELS")}

    def encoded(key: str, sig: Signature) -> dict:
        enc = tokenizer(texts[key], padding=True, truncation=True, max_length=plan.max_length, return_tensors="pt")
        return {t.name: enc[t.name] for t in sig.inputs if t.name in enc}

    def pixel_values() -> "torch.Tensor":
        from PIL import Image

        images = [Image.open(io.BytesIO(bytes(b))) for b in inputs["IMAGE"].reshape(-1).tolist()]
        processor = plan.image["processor"]
        return processor(images=images, do_convert_rgb=True, return_tensors="pt", **plan.image["overrides"])["pixel_values"]

    module = loaded.module
    with torch.no_grad():
        if model.task == "feature-extraction":
            feed = encoded("TEXT", sigs[""])
            hidden = getattr(module(**feed), sigs[""].outputs[0].name)
            pooling = sigs[""].extra.get("pooling", "mean")
            if pooling == "cls":
                pooled = hidden[:, 0]
            elif pooling == "max":
                keep = feed["attention_mask"].unsqueeze(-1).bool()
                pooled = hidden.masked_fill(~keep, -1e9).max(1).values
            else:
                mask = feed["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if sigs[""].extra.get("normalize", True):
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return {"EMBEDDING": pooled.float().numpy()}
        if model.task == "zero-shot-image-classification":
            feed = encoded("LABELS", sigs["text"])
            logits = module(input_ids=feed["input_ids"], attention_mask=feed.get("attention_mask"),
                            pixel_values=pixel_values()).logits_per_image
            if sigs["text"].extra.get("activation") == "sigmoid":  # SigLIP: each label on its own
                return {"PROBABILITIES": logits.sigmoid().float().numpy()}
            return {"PROBABILITIES": logits.softmax(-1).float().numpy()}
        if model.task == "text-classification":
            logits = module(**encoded("TEXT", sigs[""])).logits
        else:
            logits = module(pixel_values=pixel_values()).logits
    k = plan.post.sig.outputs[0].dims[-1]
    values, order = torch.sort(logits.float().softmax(-1), dim=-1, descending=True, stable=True)
    names = np.array([label.encode() for label in plan.labels], dtype=np.bytes_)
    return {"PROBABILITIES": values[:, :k].numpy(), "LABELS": names[order[:, :k].numpy()]}


def run_in_process(plan: Plan, steps: list[Step], variants: list[tuple[str, Signature]], stage: Path,
                   inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The ensemble's computation without Triton: the python models' functions and the variants' artifacts."""
    runners = {m.name: step_function(stage / m.name, m) for m in (plan.pre, plan.post)}
    for name, sig in variants:
        runners[name] = artifact_function(stage / name, sig)
    tensors = {k: as_object(v) for k, v in inputs.items()}
    for step in steps:
        outs = runners[step.model]({k: tensors[v] for k, v in step.inputs.items()})
        tensors.update({v: outs[k] for k, v in step.outputs.items()})
    got = {t.name: tensors[t.name] for t in plan.outputs}
    return got, tensors


def as_object(array: np.ndarray) -> np.ndarray:
    """'S' arrays as Triton hands BYTES to python models: object arrays of bytes."""
    if array.dtype.kind != "S":
        return array
    out = np.empty(array.shape, dtype=np.object_)
    out.reshape(-1)[:] = [bytes(x) for x in array.reshape(-1).tolist()]
    return out


def step_function(model_dir: Path, m: StepModel):
    """One staged pre/post model's computation, from its own files, as its model.py runs it for one request."""
    module = python_model(m.template)
    version = model_dir / "1"
    if m.template == "preprocess.py":
        settings = None
        if "image_processor" in m.parameters:
            settings = json.loads((version / m.parameters["image_processor"]).read_text())
        tokenizer = version / m.parameters["tokenizer"] if "tokenizer" in m.parameters else None
        pre = module.Preprocessor(json.loads(m.parameters["inputs"]), json.loads(m.parameters["kinds"]), tokenizer,
                                  settings)
        return lambda feeds: pre([pre.decode(feeds)])[0]
    labels = json.loads((version / m.parameters["labels"]).read_text(encoding="utf-8")) if "labels" in m.parameters else None
    post = module.PostProcessor(m.parameters, labels)
    tensors = json.loads(m.parameters["tensors"])
    in_roles, out_roles = module.ROLES[m.parameters["task"]]

    def run(feeds):
        answer = post({role: feeds[tensors[role]] for role in in_roles})
        return {tensors[role]: answer[role] for role in out_roles}

    return run


def artifact_function(model_dir: Path, sig: Signature):
    from builder import verify

    version = model_dir / "1"
    names = [t.name for t in sig.inputs]
    if (version / "model.onnx").is_file():
        runner = verify.OnnxRunner(version / "model.onnx")
        return lambda feeds: runner({n: feeds[n] for n in names})
    if (version / "model.pt2").is_file():
        precision = _parameters(model_dir).get("precision", "fp32")
        runner = verify.TorchRunner(version / "model.pt2", names, [t.name for t in sig.outputs], precision)
        return lambda feeds: runner({n: feeds[n] for n in names})
    raise RunError(f"{model_dir.name}: no model.onnx or model.pt2 to run the ensemble's check in-process")


def _parameters(model_dir: Path) -> dict[str, str]:
    from builder.render import parse_config

    cfg = parse_config((model_dir / "config.pbtxt").read_text(), f"{model_dir.name}/config.pbtxt")
    return {k: v.string_value for k, v in cfg.parameters.items()}


def pre_check(plan: Plan, tokenizer, tensors: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict:
    """The pre model against transformers on the reference inputs: token ids equal, pixels equal."""
    check, reasons = {}, []
    kinds = json.loads(plan.pre.parameters["kinds"])
    for source in plan.inputs:
        if source.kind == "text":
            texts = [bytes(x).decode() for x in inputs[source.name].reshape(-1).tolist()]
            enc = tokenizer(texts, padding=True, truncation=True, max_length=plan.max_length, return_tensors="np")
            differ = [name for name, kind in kinds.items() if kind != "pixels" and name in enc
                      and (enc[name].shape != tensors[name].shape or not np.array_equal(enc[name], tensors[name]))]
            check.update(tokens_match=not differ, texts=len(texts))
            if differ:
                reasons.append(f"token tensors {', '.join(differ)} differ from transformers' tokenizer")
        else:
            from PIL import Image

            images = [Image.open(io.BytesIO(bytes(b))) for b in inputs[source.name].reshape(-1).tolist()]
            want = plan.image["processor"](images=images, do_convert_rgb=True, return_tensors="np",
                                           **plan.image["overrides"])["pixel_values"]
            got = tensors[next(name for name, kind in kinds.items() if kind == "pixels")]
            diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
            check.update(pixels_max_abs=diff, images=len(images))
            if diff > 1e-4:
                reasons.append(f"pixel_values differ from transformers' image processor by {diff:.3g}")
    return {"passed": not reasons, **check, "reason": "; ".join(reasons)}


def compare_answers(got: dict[str, np.ndarray], want: dict[str, np.ndarray], variant) -> dict:
    """Pipeline answers against the PyTorch ones: per output numbers, the verdict, the self-check tolerance."""
    if "EMBEDDING" in want:
        min_cos = variant.effective_tolerance.min_cosine or 0.999
        numbers = embedding_numbers(got["EMBEDDING"], want["EMBEDDING"])
        ok = numbers["cosine"] >= min_cos
        reason = "" if ok else f"EMBEDDING: cosine {numbers['cosine']:.6f} < {min_cos}"
        return {"passed": ok, "tolerance": {"min_cosine": min_cos}, "samples": int(want["EMBEDDING"].shape[0]),
                "against": "fp32 PyTorch, transformers tokenizer, the model's pooling (+ L2 normalize)",
                "outputs": {"EMBEDDING": {"name": "EMBEDDING", **numbers, "passed": ok, "reason": reason}}, "reason": reason}
    atol = PROBABILITY_ATOL[variant.precision]
    numbers = probability_numbers(got, want, atol)
    ok = numbers["max_abs"] <= atol and numbers["top1_unexplained"] == 0
    reasons = []
    if numbers["max_abs"] > atol:
        reasons.append(f"PROBABILITIES: max abs diff {numbers['max_abs']:.3g} > {atol:g}")
    if numbers["top1_unexplained"]:
        reasons.append(f"top-1 differs on {numbers['top1_unexplained']} input(s) with a clear margin")
    # the worst per-input cosine of the probability vectors: the accuracy number a report's budget reads
    outputs = {"PROBABILITIES": {"name": "PROBABILITIES", "max_abs": numbers["max_abs"], "cosine": numbers["cosine"],
                                 "top1_agreement": numbers["top1_agreement"], "passed": ok, "reason": "; ".join(reasons)}}
    if "LABELS" in want:
        outputs["LABELS"] = {"name": "LABELS", "match": numbers["labels_match"], "passed": ok, "reason": ""}
    return {"passed": ok, "tolerance": {"atol": atol, "rtol": 0.0}, "samples": int(want["PROBABILITIES"].shape[0]),
            "against": "fp32 PyTorch with transformers' tokenizer / image processor", "outputs": outputs,
            "top1_agreement": numbers["top1_agreement"], "reason": "; ".join(reasons)}


def embedding_numbers(got: np.ndarray, want: np.ndarray) -> dict:
    got = np.asarray(got, dtype=np.float64).reshape(want.shape[0], -1)
    want = np.asarray(want, dtype=np.float64).reshape(want.shape[0], -1)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    cos = (got * want).sum(axis=1) / np.maximum(norms, 1e-30)
    return {"cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "max_abs": float(np.abs(got - want).max())}


def probability_numbers(got: dict[str, np.ndarray], want: dict[str, np.ndarray], margin: float) -> dict:
    """max |diff|, top-1 agreement, and top-1 differences not explained by a near tie (< margin)."""
    p_got = np.asarray(got["PROBABILITIES"], dtype=np.float64)
    p_want = np.asarray(want["PROBABILITIES"], dtype=np.float64)
    if p_got.shape != p_want.shape:
        return {"max_abs": float("inf"), "top1_agreement": 0.0, "top1_unexplained": len(p_want), "labels_match": False,
                "cosine": 0.0}
    cosine = embedding_numbers(p_got, p_want)["cosine"]
    if "LABELS" in want:  # sorted top-k: the first label is the top-1
        top_got = [bytes(x) for x in np.asarray(got["LABELS"])[:, 0].tolist()]
        top_want = [bytes(x) for x in np.asarray(want["LABELS"])[:, 0].tolist()]
        labels_match = [bytes(x) for x in np.asarray(got["LABELS"]).reshape(-1).tolist()] == \
                       [bytes(x) for x in np.asarray(want["LABELS"]).reshape(-1).tolist()]
        sorted_want = p_want
    else:
        top_got, top_want = p_got.argmax(-1).tolist(), p_want.argmax(-1).tolist()
        labels_match = None
        sorted_want = -np.sort(-p_want, axis=-1)
    agree = [a == b for a, b in zip(top_got, top_want)]
    gaps = sorted_want[:, 0] - sorted_want[:, 1] if sorted_want.shape[-1] > 1 else np.ones(len(agree))
    unexplained = sum(1 for ok, gap in zip(agree, gaps) if not ok and gap >= margin)
    return {"max_abs": float(np.abs(p_got - p_want).max()), "top1_agreement": float(np.mean(agree)),
            "top1_unexplained": unexplained, "labels_match": labels_match, "cosine": cosine}


# --- writing ----------------------------------------------------------------------------------

def write_step_model(model_dir: Path, m: StepModel, runtime: str, serving: dict) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PYTHON_MODELS / m.template, version / "model.py")
    for name, text in m.files.items():
        (version / name).write_text(text, encoding="utf-8")
    cpu = {**serving, "instances": serving["instances"].model_copy(update={"kind": "cpu"})}
    text = model_config(m.name, m.sig, runtime=runtime, fmt="python", serving=cpu, parameters=m.parameters, warmup=[])
    (model_dir / "config.pbtxt").write_text(text)


def write_ensemble(model_dir: Path, name: str, sig: Signature, steps: list[Step]) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version directory, even empty
    text = render_template("ensemble.pbtxt.j2", f"{name}/config.pbtxt", name=name, max_batch_size=sig.max_batch_size,
                           inputs=sig.inputs, outputs=sig.outputs,
                           steps=[{"model": s.model, "inputs": s.inputs, "outputs": s.outputs} for s in steps])
    (model_dir / "config.pbtxt").write_text(text)


def save_text_safe(path: Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """save_reference with bytes as fixed-width 'S' arrays; refuses items 'S' would change (trailing NULs)."""
    def fixed(array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if array.dtype.kind not in "OSU":
            return array
        items = [x.encode() if isinstance(x, str) else bytes(x) for x in array.reshape(-1).tolist()]
        if any(item.endswith(b"\0") for item in items):
            raise RunError(f"{path}: an item ends with a NUL byte, which fixed-width bytes arrays drop")
        return np.array(items, dtype=np.bytes_).reshape(array.shape)

    save_reference(path, {k: fixed(v) for k, v in inputs.items()}, {k: fixed(v) for k, v in outputs.items()})


def check_staged(stage: Path, names: list[str]) -> list[str]:
    from builder.render import parse_config

    configs = {}
    for name in names:
        path = stage / name / "config.pbtxt"
        if path.is_file():
            configs[name] = parse_config(path.read_text(), f"{name}/config.pbtxt")
    return check_ensembles(stage, configs)


# --- checking a repository --------------------------------------------------------------------

@dataclass(frozen=True)
class _Tensor:
    dtype: int
    dims: tuple[int, ...]
    full_dims: tuple[int, ...]  # with the batch axis of a batching model
    where: str  # "ensemble input TEXT" / "step 2 (m) output x"
    step: int = 0  # producing step (0: the ensemble's input)


def _tensor(t, mbs: int, where: str, step: int = 0) -> _Tensor:
    dims = tuple(int(d) for d in t.dims)
    return _Tensor(t.data_type, dims, (-1, *dims) if mbs > 0 else dims, where, step)


def _compatible(a: _Tensor, b: _Tensor) -> bool:
    """As Triton's ensemble check: dims match (-1 matches anything), with or without the batch axis."""
    def same(x, y):
        return len(x) == len(y) and all(p == q or -1 in (p, q) for p, q in zip(x, y))

    return same(a.dims, b.dims) or same(a.full_dims, b.full_dims)


def _dtype(code: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(code)


def check_ensembles(repo: Path, configs: dict) -> list[str]:
    """Every wiring problem of the ensembles among `configs` (name -> parsed ModelConfig), one line each.

    Each step's model exists; every mapped tensor exists in that model's config with the same dtype
    and compatible dims; every tensor a step reads is produced once (by the ensemble's input or an
    earlier step's output); no cycles; every ensemble input is used; every ensemble output produced.
    `repo` tells a missing model from one whose config.pbtxt is there but did not parse.
    """
    problems: list[str] = []
    for name in sorted(configs):
        cfg = configs[name]
        if cfg.platform == "ensemble":
            problems += _check_ensemble(Path(repo), name, cfg, configs)
    return problems


def _check_ensemble(repo: Path, name: str, cfg, configs: dict) -> list[str]:
    problems: list[str] = []
    steps = list(cfg.ensemble_scheduling.step)
    if not steps:
        return [f"{name}: ensemble_scheduling has no step"]
    produced = {t.name: _tensor(t, cfg.max_batch_size, f"ensemble input {t.name}") for t in cfg.input}
    reads: dict[str, list[tuple[str, _Tensor, str]]] = defaultdict(list)  # tensor -> (where, consumer spec, key)
    edges: dict[int, set[int]] = defaultdict(set)
    for index, step in enumerate(steps, 1):
        where = f"{name}: step {index} ({step.model_name})"
        model = configs.get(step.model_name)
        if model is None:
            why = ("has a config.pbtxt that could not be parsed" if (repo / step.model_name / "config.pbtxt").is_file()
                   else "is not in the repository")
            problems.append(f"{where}: model {step.model_name} {why}")
            continue
        if cfg.max_batch_size > 0 and model.max_batch_size < cfg.max_batch_size:
            problems.append(f"{where}: max_batch_size {model.max_batch_size} is below the ensemble's {cfg.max_batch_size}")
        ins = {t.name: t for t in model.input}
        outs = {t.name: t for t in model.output}
        for key, tensor in step.input_map.items():
            if key not in ins:
                problems.append(f"{where}: input_map reads {tensor!r} into input {key!r}, which {step.model_name} "
                                f"does not have (its inputs: {', '.join(ins) or 'none'})")
                continue
            reads[tensor].append((where, _tensor(ins[key], model.max_batch_size, f"input {key}", index), key))
        for t in model.input:
            if t.name not in step.input_map and not t.optional:
                problems.append(f"{where}: input {t.name} of {step.model_name} is not mapped")
        for key, tensor in step.output_map.items():
            if key not in outs:
                problems.append(f"{where}: output_map maps output {key!r} to {tensor!r}, but {step.model_name} has "
                                f"no output {key!r} (its outputs: {', '.join(outs) or 'none'})")
                continue
            if tensor in produced:
                problems.append(f"{where}: output {key} writes tensor {tensor!r}, already written by {produced[tensor].where}")
                continue
            produced[tensor] = _tensor(outs[key], model.max_batch_size, f"step {index} ({step.model_name}) output {key}", index)
    for tensor, uses in reads.items():
        source = produced.get(tensor)
        for where, use, key in uses:
            if source is None:
                problems.append(f"{where}: input {key} reads tensor {tensor!r}, which is neither an ensemble input "
                                f"nor produced by any step")
                continue
            edges[source.step].add(use.step)
            if source.dtype != use.dtype:
                problems.append(f"{where}: input {key} is {_dtype(use.dtype)} but tensor {tensor!r} "
                                f"({source.where}) is {_dtype(source.dtype)}")
            elif not _compatible(source, use):
                problems.append(f"{where}: input {key} has dims {list(use.dims)} but tensor {tensor!r} "
                                f"({source.where}) has dims {list(source.dims)}")
    for t in cfg.output:
        want = _tensor(t, cfg.max_batch_size, f"ensemble output {t.name}")
        source = produced.get(t.name)
        if source is None or source.step == 0:
            problems.append(f"{name}: output {t.name} is produced by no step (no output_map writes {t.name!r})")
        elif source.dtype != want.dtype:
            problems.append(f"{name}: output {t.name} is {_dtype(want.dtype)} but {source.where} is {_dtype(source.dtype)}")
        elif not _compatible(source, want):
            problems.append(f"{name}: output {t.name} has dims {list(want.dims)} but {source.where} has {list(source.dims)}")
    for t in cfg.input:
        if t.name not in reads:
            problems.append(f"{name}: input {t.name} is used by no step")
    cycle = _cycle(edges)
    if cycle:
        names = " -> ".join(f"step {i} ({steps[i - 1].model_name})" for i in cycle)
        problems.append(f"{name}: steps form a cycle: {names}")
    return problems


def _cycle(edges: dict[int, set[int]]) -> list[int]:
    """One cycle among step numbers (0 is the ensemble input), or []."""
    state: dict[int, int] = {}  # 1: on the path, 2: done
    path: list[int] = []

    def visit(node: int) -> list[int]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


# --- end to end on a served repository --------------------------------------------------------

def check_ensemble_e2e(server, repo: Path, name: str, *, record: bool = False) -> dict:
    """Send the ensemble's reference inputs (real text / images) through the served ensemble, all in one
    request and then one item per request, and compare with the PyTorch answers stored at build time.

    Returns the numbers (embeddings: worst cosine; classifiers / CLIP: top-1 agreement, max probability
    difference), "passed" and one line per problem. With `record` they go into the manifest entry's
    verification["served"].
    """
    from tritonclient.http import InferenceServerClient

    from builder.runtime.selfcheck import TIMEOUT_S, infer

    repo = Path(repo)
    manifest = read_manifest(repo)
    entry = manifest["models"].get(name)
    if entry is None or entry.get("role") != "ensemble":
        known = sorted(n for n, e in manifest["models"].items() if e.get("role") == "ensemble")
        raise UserError(f"{name}: not an ensemble of {repo} (ensembles: {', '.join(known) or 'none'})")
    sig = signature_of(entry)
    inputs, expected = load_reference(repo / name / entry["reference"])
    # one item per request: each text or image; CLIP's candidate LABELS go whole with every request
    item = next(t.name for t in sig.inputs if t.name != "LABELS")
    count = inputs[item].shape[0]
    requests = [(slice(0, count), inputs)] + [
        (slice(i, i + 1), {k: (v[i:i + 1] if k == item else v) for k, v in inputs.items()}) for i in range(count)]
    client = InferenceServerClient(server.http_url, connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S)
    problems: list[str] = []
    merged: dict[str, list] = defaultdict(list)
    try:
        for rows, feeds in requests:
            try:
                got = infer(client, name, sig, feeds)
            except Exception as exc:  # noqa: BLE001 - report the server's answer with the request
                problems.append(f"request of items {rows.start}..{rows.stop - 1}: {' '.join(str(exc).split())}")
                continue
            for key, value in got.items():
                merged[key].append((rows, value))
    finally:
        client.close()
    tolerance = entry.get("verification", {}).get("tolerance", {})
    result: dict = {"model": name, "variant": entry.get("variant"), "requests": len(requests), "items": int(count)}
    if not problems:
        result.update(_served_numbers(merged, expected, tolerance, problems))
    result["passed"] = not problems
    result["problems"] = problems
    if record:
        entry.setdefault("verification", {})["served"] = result
        write_manifest(repo, manifest)
    return result


def _served_numbers(merged: dict, expected: dict, tolerance: dict, problems: list[str]) -> dict:
    """Served answers (per request rows) against the expected ones; appends a line per problem."""
    out: dict = {}
    if "EMBEDDING" in expected:
        cosines, diffs = [], []
        for rows, value in merged["EMBEDDING"]:
            numbers = embedding_numbers(value, expected["EMBEDDING"][rows])
            cosines.append(numbers["cosine"])
            diffs.append(numbers["max_abs"])
        out.update(cosine=min(cosines), max_abs=max(diffs))
        floor = tolerance.get("min_cosine") or 0.999
        if out["cosine"] < floor:
            problems.append(f"EMBEDDING: cosine {out['cosine']:.6f} < {floor}")
        return out
    atol = tolerance.get("atol", 1e-4)
    agreement, diffs, unexplained, labels = [], [], 0, True
    for index, (rows, probabilities) in enumerate(merged["PROBABILITIES"]):
        got = {"PROBABILITIES": probabilities}
        want = {"PROBABILITIES": expected["PROBABILITIES"][rows]}
        if "LABELS" in expected:
            got["LABELS"], want["LABELS"] = merged["LABELS"][index][1], expected["LABELS"][rows]
        numbers = probability_numbers(got, want, atol)
        agreement.append((numbers["top1_agreement"], rows.stop - rows.start))
        diffs.append(numbers["max_abs"])
        unexplained += numbers["top1_unexplained"]
        labels = labels and numbers["labels_match"] is not False
    out["top1_agreement"] = sum(a * n for a, n in agreement) / sum(n for _, n in agreement)
    out["max_abs"] = max(diffs)
    if "LABELS" in expected:
        out["labels_match"] = labels
    if out["max_abs"] > atol:
        problems.append(f"PROBABILITIES: max abs diff {out['max_abs']:.3g} > {atol:g}")
    if unexplained:
        problems.append(f"top-1 differs on {unexplained} input(s) with a clear margin")
    return out
