"""Numerics of an artifact against the fp32 PyTorch source: every output, every sample, every failure."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from builder import cpu

if TYPE_CHECKING:
    from builder.spec import Tolerance


@dataclass(frozen=True)
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    cosine: float  # worst per-sample cosine similarity
    passed: bool
    reason: str = ""


def compare(name: str, got: np.ndarray, want: np.ndarray, tol: Tolerance, mask: np.ndarray | None = None) -> OutputCheck:
    """`mask` (batch, seq): for per-token outputs, padded positions are left out (nobody reads them)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return OutputCheck(name, float("inf"), float("inf"), 0.0, False, f"shape {got.shape} != {want.shape}")
    if mask is not None and got.ndim >= 2 and got.shape[:2] == mask.shape:
        keep = mask.astype(bool).reshape(mask.shape + (1,) * (got.ndim - 2))
        got, want = np.where(keep, got, 0.0), np.where(keep, want, 0.0)
    if not np.isfinite(got).all():
        return OutputCheck(name, float("inf"), float("inf"), 0.0, False, "non-finite values")
    diff = np.abs(got - want)
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / np.maximum(np.abs(want), 1e-6)).max(initial=0.0))
    g = got.reshape(got.shape[0], -1) if got.ndim > 1 else got.reshape(1, -1)
    w = want.reshape(g.shape)
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1)
    cos = np.where(norms > 0, (g * w).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)
    cosine = float(cos.min(initial=1.0))
    reasons = out_of_tolerance(max_abs, cosine, tol)
    return OutputCheck(name, max_abs, max_rel, cosine, not reasons, "; ".join(reasons))


def out_of_tolerance(max_abs: float, cosine: float, tol: Tolerance) -> list[str]:
    reasons = []
    if tol.atol is not None and max_abs > tol.atol:
        reasons.append(f"max abs diff {max_abs:.3g} > {tol.atol:g}")
    if tol.min_cosine is not None and cosine < tol.min_cosine:
        reasons.append(f"cosine {cosine:.6f} < {tol.min_cosine:g}")
    return reasons


def summarize(checks_per_sample: list[list[OutputCheck]], tol: Tolerance) -> dict:
    """Worst numbers per output over all samples, and the overall verdict."""
    worst: dict[str, OutputCheck] = {}
    for checks in checks_per_sample:
        for c in checks:
            w = worst.get(c.name)
            if w is None:
                worst[c.name] = c
            else:
                max_abs, cosine = max(w.max_abs, c.max_abs), min(w.cosine, c.cosine)
                # the reason names the worst numbers over all samples (a shape or non-finite problem stays)
                broken = [r for r in (w.reason, c.reason) if r.startswith(("shape", "non-finite"))]
                reason = broken[0] if broken else "; ".join(out_of_tolerance(max_abs, cosine, tol))
                worst[c.name] = OutputCheck(c.name, max_abs, max(w.max_rel, c.max_rel), cosine,
                                            w.passed and c.passed, reason)
    return {
        "passed": all(c.passed for c in worst.values()),
        "tolerance": tol.model_dump(),
        "samples": len(checks_per_sample),
        "outputs": {name: asdict(c) for name, c in worst.items()},
        "cpu": cpu.describe(),  # int8 / fp16 kernels differ by instruction set: the numbers hold for this CPU
    }


def failure_lines(result: dict) -> list[str]:
    """Every failing output, Optimum-style: '- logits: max abs diff 3e-3 > 1e-3'."""
    return [f"- {name}: {c['reason']}" for name, c in result["outputs"].items() if not c["passed"]]


class OnnxRunner:
    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})
        return dict(zip(self.outputs, values))


def load_program(path: Path, device: str):
    """A saved ExportedProgram's module on `device` ("cpu", "cuda:0"), loaded as the served runner loads it."""
    from builder.paths import python_template

    return python_template("backend_common").load_program(path, device)


class TorchRunner:
    def __init__(self, path: Path, input_names: list[str], output_names: list[str], precision: str, device: str = "cpu"):
        import torch

        from builder.convert.torch2exported import DTYPES

        self.torch = torch
        self.device = f"cuda:{torch.cuda.current_device()}" if device == "gpu" and torch.cuda.is_available() else "cpu"
        self.module = load_program(path, self.device)
        self.dtype = getattr(torch, DTYPES[precision])
        self.input_names, self.output_names = input_names, output_names

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = []
        for name in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
            args.append(t.to(self.dtype) if t.is_floating_point() else t)
        with torch.no_grad():
            out = self.module(*args)
        return {n: as_numpy(o) for n, o in zip(self.output_names, out)}


def torch_reference(module, input_names: list[str], feeds: dict[str, np.ndarray], output_names) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names])
    return {n: as_numpy(o) for n, o in zip(output_names, out)}


def as_numpy(tensor) -> np.ndarray:
    """Floating outputs as float32 (bf16 has no numpy dtype); integer and bool outputs keep their type."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
