"""The tensor signature of a model: extracted once, read by every later stage.

Rendering, warmup, validation, the server self-check and perf input generation all read this record;
nothing downstream re-derives names, dtypes or value ranges, or types them by hand.
Dims never include the batch dimension; -1 marks a dynamic axis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# numpy dtype name -> Triton config / protocol name
TRITON_DTYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int32": "INT32",
    "int64": "INT64",
    "uint64": "UINT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bytes": "BYTES",
}

# What a tensor carries decides which values are valid for it.
KINDS = ("token_ids", "attention_mask", "token_type_ids", "position_ids", "pixels", "text", "image", "float")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name, a key of TRITON_DTYPES
    dims: tuple[int, ...]  # without the batch dimension; -1 = dynamic
    kind: str = "float"
    high: int | None = None  # exclusive upper bound for integer ids (the vocabulary size)
    max_dims: tuple[int, ...] | None = None  # upper limit of each dim (dynamic dims included)
    opt_dims: tuple[int, ...] | None = None  # typical shape used for warmup, perf and checks

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_DTYPES:
            raise ValueError(f"tensor {self.name}: unknown dtype {self.dtype!r}")
        if self.kind not in KINDS:
            raise ValueError(f"tensor {self.name}: unknown kind {self.kind!r}")
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        for attr in ("max_dims", "opt_dims"):
            value = getattr(self, attr)
            if value is not None:
                object.__setattr__(self, attr, tuple(int(d) for d in value))

    @property
    def triton_dtype(self) -> str:
        return "TYPE_" + ("STRING" if self.dtype == "bytes" else TRITON_DTYPES[self.dtype])

    @property
    def protocol_dtype(self) -> str:
        return TRITON_DTYPES[self.dtype]

    def example_shape(self) -> tuple[int, ...]:
        """A concrete shape (no batch) for generated inputs: opt_dims, else dims with -1 -> 8."""
        if self.opt_dims is not None:
            return self.opt_dims
        return tuple(8 if d == -1 else d for d in self.dims)


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0  # 0: the model has no batch dimension
    extra: dict = field(default_factory=dict)  # family facts: vocab size, labels, image size...

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Signature":
        def tensors(items):
            return tuple(TensorSpec(**{**t, "dims": tuple(t["dims"])}) for t in items)

        return cls(
            inputs=tensors(data["inputs"]),
            outputs=tensors(data["outputs"]),
            max_batch_size=int(data.get("max_batch_size", 0)),
            extra=dict(data.get("extra", {})),
        )

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)


SAMPLE_TEXTS = (
    "Triton serves models from a repository on disk.",
    "A quick brown fox jumps over the lazy dog.",
    "Dynamic batching groups requests that arrive close together.",
    "Ünïcödé text, emoji 🚀 and numbers 12345 are tokenized too.",
    "Short.",
    "The embedding of a sentence is the mean of its token vectors, normalized to unit length.",
)


def make_inputs(sig: Signature, batch: int, rng: np.random.Generator | None = None,
                shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Valid, non-trivial inputs for every input of `sig`.

    Token ids lie in [1, vocab), masks are ones, token types zeros, pixels standard-normal,
    text is real sentences, uint8 pixels uniform in 0-255. `batch` is prepended when the model batches (max_batch_size > 0).
    """
    rng = rng or np.random.default_rng(0)
    shapes = shapes or {}
    out: dict[str, np.ndarray] = {}
    for t in sig.inputs:
        shape = tuple(shapes.get(t.name, t.example_shape()))
        if sig.max_batch_size > 0:
            shape = (batch, *shape)
        if t.kind == "token_ids":
            value = rng.integers(1, t.high or 2, size=shape)
        elif t.kind == "attention_mask":
            value = np.ones(shape)
        elif t.kind in ("token_type_ids",):
            value = np.zeros(shape)
        elif t.kind == "pixels" and t.dtype == "uint8":  # image_input: uint8, pixels as decoded
            value = rng.integers(0, 256, size=shape)
        elif t.kind == "position_ids":
            value = np.broadcast_to(np.arange(shape[-1]), shape)
        elif t.kind == "text":
            texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)].encode() for i in range(int(np.prod(shape)))]
            out[t.name] = np.array(texts, dtype=np.object_).reshape(shape)
            continue
        elif t.kind == "image":
            raise ValueError(f"tensor {t.name}: encoded images are made by builder.families.images")
        else:
            value = rng.standard_normal(shape)
        out[t.name] = np.ascontiguousarray(value).astype(t.dtype)
    return out
