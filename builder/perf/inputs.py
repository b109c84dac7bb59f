"""perf_analyzer `--input-data` JSON from a model's Signature.

perf_analyzer's default random data indexes far outside a vocabulary (on a GPU that poisons the
CUDA context); the values here come from `builder.signature.make_inputs`, so token ids lie below the
vocabulary size, masks are ones and text is real sentences. Shapes carry no batch dimension:
perf_analyzer adds it from `-b`.

    {"data": [{"input_ids": {"content": [101, 2023, ...], "shape": [16]}, ...}, ...]}
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from builder.errors import UserError
from builder.signature import Signature, make_inputs

PERF_INPUT = "perf_input.json"  # `build` writes <model>/perf_input.json: input_data() of its signature


def input_data(sig: Signature, *, entries: int = 4, seed: int = 0,
               shapes: dict[str, tuple[int, ...]] | None = None, tokenizer=None) -> dict:
    """`entries` distinct requests (batch 1, no batch dim) for every input of `sig`.

    With `tokenizer` (a `tokenizers.Tokenizer`, the one a model's ensemble serves with), token inputs
    are the sample sentences the ensemble is measured with, tokenized one per request: bare variants
    and their ensemble then see the same token-length distribution."""
    if entries < 1:
        raise UserError(f"input entries {entries} must be >= 1")
    # Generate all entries as one batch (so text rotates through the sample sentences and ids differ),
    # then split: a non-batching model is treated as batching here only to get the leading axis.
    # Encoded images are real files (builder.ensembles.sample_images), one per request, sent as "b64":
    # perf_analyzer sends the decoded bytes as the tensor's raw contents, so they hold Triton's serialized
    # BYTES form (a 4-byte little-endian length, then the image file), not the bare file.
    # (An image tensor of another dtype is left to make_inputs, which refuses it.)
    plain = tuple(t for t in sig.inputs if not (t.kind == "image" and t.dtype == "bytes"))
    batched = replace(sig, inputs=plain, max_batch_size=max(sig.max_batch_size, entries))
    try:
        arrays = make_inputs(batched, entries, rng=np.random.default_rng(seed), shapes=shapes)
    except ValueError as exc:
        raise UserError(f"perf input data: {exc}") from exc
    images = None
    if len(plain) < len(sig.inputs):
        from builder.ensembles import sample_images

        images = sample_images(entries, seed=seed)
    if tokenizer is not None and any(t.kind == "token_ids" for t in plain) and sig.max_batch_size > 0:
        arrays.update(tokenized(tokenizer, plain, entries))
    data = []
    for i in range(entries):
        entry = {}
        for spec in sig.inputs:
            if spec.name not in arrays:
                entry[spec.name] = {"b64": base64.b64encode(len(images[i]).to_bytes(4, "little") + images[i]).decode("ascii"),
                                    "shape": [1] * len(spec.dims)}
                continue
            value = np.asarray(arrays[spec.name][i])
            if spec.dtype == "bytes":
                content = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]
            else:
                content = value.reshape(-1).tolist()
            entry[spec.name] = {"content": content, "shape": list(value.shape)}
        data.append(entry)
    return {"data": data}


TOKEN_FIELDS = {"token_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def tokenized(tokenizer, inputs, entries: int) -> dict[str, list[np.ndarray]]:
    """Per request, the token tensors of one sample sentence (the same rotation as make_inputs' text)."""
    from builder.signature import SAMPLE_TEXTS

    tokenizer.no_padding()
    encodings = [tokenizer.encode(SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]) for i in range(entries)]
    return {t.name: [np.asarray(getattr(e, TOKEN_FIELDS[t.kind]), dtype=t.dtype) for e in encodings]
            for t in inputs if t.kind in TOKEN_FIELDS}


def ensemble_tokenizer(repo: Path, entry: dict):
    """The tokenizer of the ensemble built for this variant's model (`{model}_pre/1/tokenizer.json`), if any."""
    path = Path(repo) / f"{entry.get('model', '')}_pre" / "1" / "tokenizer.json"
    if entry.get("role", "variant") != "variant" or not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def describe_inputs(path: Path) -> str:
    """What the requests of an input-data file hold, in words: '4 texts' or 'input_ids of 7-20 tokens'."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    parts = []
    for name in data[0]:
        values = [e[name] for e in data]
        if "b64" in values[0]:
            parts.append(f"{name}: {len(values)} encoded images")
        elif values[0]["content"] and isinstance(values[0]["content"][0], str):
            parts.append(f"{name}: {len(values)} sample sentences")
        else:
            shapes = sorted({tuple(v["shape"]) for v in values})
            text = " / ".join("x".join(map(str, s)) for s in shapes) if len(shapes) <= 3 else \
                f"{'x'.join(map(str, shapes[0]))} to {'x'.join(map(str, shapes[-1]))}"
            parts.append(f"{name} [{text}]")
    return ", ".join(parts)


def write_input_data(sig: Signature, path: Path, **kwargs) -> Path:
    """Write `input_data(sig, **kwargs)` as JSON to `path` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data(sig, **kwargs), ensure_ascii=False) + "\n", encoding="utf-8")
    return path
