"""Task families: what a task's exported parts take and give, declared once.

A family turns a loaded model into one or more `Part`s (CLIP has a text and an image part; the others
have one). Each part is a torch module with positional inputs in the order of its `inputs` and a tuple
of outputs in the order of `outputs`. Adding a family is one small module here with one `@register` line
(docs/EXTENDING.md).
"""

from __future__ import annotations

import numpy as np

from builder.errors import UserError
from builder.families.base import (AUTO_CLASSES, FAMILIES, TOKEN_KINDS, Part, Wrapped, accepts,  # noqa: F401
                                   register, token_inputs)
from builder.signature import SAMPLE_TEXTS, TensorSpec


def tasks() -> tuple[str, ...]:
    """Every task a family is registered for, sorted."""
    _load()
    return tuple(sorted(FAMILIES))


def auto_class(task: str) -> str:
    """The transformers Auto class that loads a Hugging Face model for `task`."""
    _load()
    return AUTO_CLASSES[task]


def parts_for(task: str, loaded, model_spec) -> list[Part]:
    _load()
    if loaded.config is None:
        if getattr(model_spec, "image_input", "float32") != "float32":
            raise UserError(f"models[{model_spec.name}].image_input: {model_spec.image_input} needs a Hugging Face "
                            "image model (its image processor settings); a factory source has none: remove image_input")
        return factory_part(loaded)
    if task not in FAMILIES:
        raise UserError(f"task {task!r} has no family; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[task](loaded, model_spec)


def sample_batches(part: Part, tokenizer, count: int, seed: int, typical_len: int) -> list[dict[str, np.ndarray]]:
    """Fresh, real-looking input batches of varied batch size and length (never zeros).

    With a tokenizer, token inputs come from real sentences; otherwise ids are random below the vocab.
    """
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(count):
        batch = (1, 3, 2, 4)[i % 4]
        spec_len = next((t.max_dims[-1] for t in part.inputs if t.kind == "token_ids" and t.max_dims), None)
        length = max(2, min(spec_len or typical_len, typical_len + (i * 5) % 11 - 3))
        arrays = part.arrays(batch, rng, length)
        if tokenizer is not None and "input_ids" in arrays:
            start = int(rng.integers(len(SAMPLE_TEXTS)))
            texts = [SAMPLE_TEXTS[(start + j) % len(SAMPLE_TEXTS)] for j in range(batch)]
            enc = tokenizer(texts, padding=True, truncation=True, max_length=spec_len or typical_len, return_tensors="np")
            for name in arrays:
                if name in enc:
                    arrays[name] = enc[name].astype(np.int64)
        batches.append(arrays)
    return batches


def factory_part(loaded) -> list[Part]:
    """A model from a factory: inputs are read off its example tensors, all dims but batch fixed."""
    import torch

    example = loaded.example_inputs
    names = list(example)
    specs = []
    for name, value in example.items():
        value = torch.as_tensor(value)
        dtype = str(value.dtype).removeprefix("torch.")
        if value.dtype.is_floating_point:
            specs.append(TensorSpec(name, dtype, tuple(value.shape[1:]), kind="float"))
        else:
            specs.append(TensorSpec(name, dtype, tuple(value.shape[1:]), kind="token_ids", high=int(value.max()) + 1))
    with torch.no_grad():
        out = loaded.module(*[torch.as_tensor(example[n]) for n in names])
    if isinstance(out, dict):
        outputs = tuple(out)

        def forward(m, *args):
            result = m(*args)
            return [result[k] for k in outputs]
    else:
        count = len(out) if isinstance(out, (tuple, list)) else 1
        outputs = tuple(f"output_{i}" for i in range(count))

        def forward(m, *args):
            result = m(*args)
            return list(result) if isinstance(result, (tuple, list)) else [result]

    return [Part("", Wrapped(forward, loaded.module), tuple(specs), outputs, {})]


def _load() -> None:
    """Import every module of this package once: each registers its families (a new family is a new module)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
