"""What a family is made of: the `Part` record, the family registry and the helpers every family
module uses (see builder.families)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from builder.signature import Signature, TensorSpec, make_inputs


@dataclass(frozen=True)
class Part:
    suffix: str  # "" for single-part models, else e.g. "text" / "image"
    module: object  # torch.nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    extra: dict = field(default_factory=dict)  # facts for pre/post-processing: labels, logit scale...
    batch_in_dims: bool = False  # True when max_batch_size is 0: dims[0] is the (dynamic) batch axis

    def signature(self, max_batch_size: int) -> Signature:
        """Input-side signature (outputs are filled in from the exported artifact)."""
        return Signature(self.inputs, (), max_batch_size, dict(self.extra))

    def arrays(self, batch: int, rng, length: int | None = None) -> dict[str, np.ndarray]:
        """Valid inputs with `batch` rows (and token inputs of `length`), whichever way the batch is declared."""
        shapes = {}
        for t in self.inputs:
            shape = list(t.example_shape())
            if self.batch_in_dims:
                shape[0] = batch
            if length is not None and t.kind in TOKEN_KINDS:
                shape[-1] = length
            shapes[t.name] = tuple(shape)
        return make_inputs(self.signature(0 if self.batch_in_dims else 1), batch, rng, shapes)


TOKEN_KINDS = ("token_ids", "attention_mask", "token_type_ids")


FAMILIES: dict[str, Callable] = {}  # task -> (loaded model, model spec) -> its parts
AUTO_CLASSES: dict[str, str] = {}  # task -> the transformers Auto class that loads its models


def register(task: str, auto: str):
    """Declare the family of `task`: the decorated function turns a loaded model into its parts; `auto` names
    the transformers class that loads a Hugging Face model for it (AutoModelForSequenceClassification)."""
    def deco(fn: Callable) -> Callable:
        if task in FAMILIES:
            raise ValueError(f"family {task!r} is registered twice")
        FAMILIES[task], AUTO_CLASSES[task] = fn, auto
        return fn

    return deco


class Wrapped:
    """Builds an nn.Module whose forward takes positional tensors and returns a tuple."""

    def __new__(cls, fn: Callable, owner):
        import torch

        class _Part(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = owner

            def forward(self, *args):
                return tuple(fn(self.inner, *args))

        return _Part().eval()


def accepts(module, arg: str) -> bool:
    return arg in inspect.signature(module.forward).parameters


def token_inputs(vocab_size: int, max_len: int, typical: int, with_types: bool) -> tuple[TensorSpec, ...]:
    common = dict(dtype="int64", dims=(-1,), max_dims=(max_len,), opt_dims=(typical,))
    specs = [TensorSpec("input_ids", kind="token_ids", high=int(vocab_size), **common),
             TensorSpec("attention_mask", kind="attention_mask", **common)]
    if with_types:
        specs.append(TensorSpec("token_type_ids", kind="token_type_ids", **common))
    return tuple(specs)
