"""Real inputs (sentences, images), the original PyTorch model's answers to them, and the numbers
that compare a pipeline's answers with those."""

from __future__ import annotations

import io
import json

import numpy as np

from builder.ensembles.plan import Plan
from builder.signature import Signature


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
            # the recipe from the token vectors, whether the variant serves those or the vector pooled inside it
            hidden = module(**feed).last_hidden_state
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
            got = tensors[next(name for name, kind in kinds.items() if kind == "pixels")]
            raw = {"do_rescale": False, "do_normalize": False} if got.dtype == np.uint8 else {}  # image_input: uint8
            want = plan.image["processor"](images=images, do_convert_rgb=True, return_tensors="np",
                                           **plan.image["overrides"], **raw)["pixel_values"]
            diff = float(np.abs(got.astype(np.float64) - want).max()) if got.shape == want.shape else float("inf")
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
