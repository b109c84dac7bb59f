"""What a profile is made of (one variant's runs, operator categories, the bound it is under): the
records that profile measures, advice reads and report writes."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

CATEGORIES = ("matmul", "attention", "normalization", "elementwise", "copies", "other")
_PATTERNS = [  # first match wins; names are lower-cased torch aten names or ONNX op types
    ("attention", r"attention|softmax|sdpa|flash|efficient_attention"),
    ("copies", r"quantizelinear"),  # (Dynamic)QuantizeLinear / DequantizeLinear convert data, no matmul
    ("matmul", r"matmul|gemm|addmm|\bmm\b|::mm$|bmm|linear|conv|einsum|baddbmm"),
    ("normalization", r"norm"),
    # data movement; torch's view ops (view, permute, expand...) copy nothing and stay in "other"
    ("copies", r"copy|memcpy|clone|contiguous|_to_copy|::to$|cast|^transpose$|cat$|concat|gather|index_select|"
               r"embedding|split"),
    ("elementwise", r"elementwise|vectorized|add|mul|div|sub|gelu|relu|tanh|erf|sqrt|pow|exp|where|neg|rsqrt|sigmoid|silu|mean|sum|"
                    r"clamp|bias|fill|ones|zeros|masked|eq|ne$|lt$|gt$|abs|max|min"),
]
OVERHEAD_US_PER_OP = 20.0  # below this mean time per operator, dispatch/launch overhead dominates
BUSY_RATIO_LAUNCH_BOUND = 0.6  # GPU: kernels busy less than this share of the wall time per forward


def category(op: str) -> str:
    name = op.lower()
    for cat, pattern in _PATTERNS:
        if re.search(pattern, name):
            return cat
    return "other"


@dataclass
class Run:
    """One variant at one batch size."""

    batch: int
    ms_per_forward: float
    ops: list[dict]  # {"name", "category", "calls", "self_us"} per operator, heaviest first (per forward)
    shares: dict[str, float]  # category -> share of the summed self time
    flops: float | None  # per forward
    bytes: float | None  # per forward (inputs + outputs of every operator)
    peak_bytes: float | None  # peak allocated during a forward (activations, inputs, outputs)
    trace: str  # file name of the Chrome trace, beside the report
    kernel_busy_ms: float | None = None  # GPU: summed kernel time per forward
    ops_per_forward: float | None = None

    @property
    def us_per_op(self) -> float | None:
        return self.ms_per_forward * 1000 / self.ops_per_forward if self.ops_per_forward else None

    @property
    def busy_ratio(self) -> float | None:
        return self.kernel_busy_ms / self.ms_per_forward if self.kernel_busy_ms is not None else None


@dataclass
class VariantProfile:
    variant: str
    model: str
    format: str
    precision: str
    device: str
    threads: int  # served intra-op threads (0: the runtime's default)
    instances: int
    runs: list[Run] = field(default_factory=list)
    weights_bytes: float | None = None
    all_threads_ms: float | None = None  # CPU: the largest batch's forward with every core
    peak: dict = field(default_factory=dict)  # {"flops": ..., "bytes_per_s": ..., "how": ...}
    config: dict = field(default_factory=dict)  # serving settings read from config.pbtxt
    notes: list[str] = field(default_factory=list)

    def run(self, batch: int) -> Run | None:
        return next((r for r in self.runs if r.batch == batch), None)

    def to_dict(self) -> dict:
        out = asdict(self)
        for r, d in zip(self.runs, out["runs"]):
            d["us_per_op"], d["busy_ratio"] = r.us_per_op, r.busy_ratio
        return out

    @property
    def peak_flops(self) -> float | None:
        """The floating-point peak this variant is held against; none for integer (int8/int4) matmuls,
        which run above it and whose own peak is not measured here."""
        return None if self.precision in ("int8", "int4") else self.peak.get("flops")

    def bound(self, run: Run) -> str:
        """launch-bound / overhead-bound / compute-bound / memory-bound, from the numbers (module docstring)."""
        if run.busy_ratio is not None:
            if run.busy_ratio < BUSY_RATIO_LAUNCH_BOUND:
                return "launch-bound"
        elif run.us_per_op is not None and run.us_per_op < OVERHEAD_US_PER_OP:
            return "overhead-bound"
        if run.flops and run.bytes and self.peak_flops and self.peak.get("bytes_per_s"):
            ridge = self.peak_flops / self.peak["bytes_per_s"]
            return "compute-bound" if run.flops / run.bytes >= ridge else "memory-bound"
        return "– (no integer peak)" if self.precision in ("int8", "int4") else "–"


def shares(ops: list[dict]) -> dict[str, float]:
    total = sum(o["self_us"] for o in ops)
    return {c: (sum(o["self_us"] for o in ops if o["category"] == c) / total if total else 0.0) for c in CATEGORIES}
