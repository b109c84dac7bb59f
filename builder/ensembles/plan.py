"""What the ensembles of one model are made of: the pre/post python models, the ensemble's I/O, the steps."""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from builder.ensembles.processing import image_processing, serialized_tokenizer
from builder.errors import RunError, UserError
from builder.signature import Signature, TensorSpec


PYTHON_MODELS = Path(__file__).resolve().parent.parent.parent / "templates" / "python"
TOKEN_KINDS = {"token_ids", "attention_mask", "token_type_ids", "position_ids"}
PARTS = {"zero-shot-image-classification": ("image", "text")}  # other tasks: one part, suffix ""
FOLDED = "sentence_embedding"  # feature-extraction's output with the pooling recipe inside the model


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
        outputs = (TensorSpec("EMBEDDING", "float32", (*batch, first.dims[-1])),)
        rank = len(first.dims) - len(batch)  # axes after the batch: 2 for token vectors, 1 for a sentence vector
        if rank == 1 and first.name == FOLDED:
            # the exported vector already holds the whole recipe (pooling, and L2 normalization where
            # modules.json ends in Normalize): the step only hands it on as float32, and normalizing it
            # here would do it twice
            params = {"task": "pooled", "tensors": json.dumps({"vector": first.name, "embedding": "EMBEDDING"})}
            return StepModel(name, "postprocess", "postprocess.py", Signature((first,), outputs, mbs), params), None
        if rank < 2:
            raise UserError(f"models[{model.name}].outputs: {first.name} is not a sentence embedding the ensemble can "
                            f"serve; list {FOLDED} (pooled in the model) or last_hidden_state (pooled by the "
                            f"ensemble) first")
        mask = next((t for t in sig.inputs if t.kind == "attention_mask"), None)
        if mask is None:
            raise UserError(f"models[{model.name}].ensemble: pooling {first.name} needs an attention_mask input and "
                            f"the model takes none")
        pooling = sig.extra.get("pooling", "mean")
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
