"""Format `torch`: a self-contained ExportedProgram (`model.pt2`, fp32 / fp16 / bf16), served by the
python backend's torch runner (CUDA graphs and torch.compile on the GPU)."""

from __future__ import annotations

import json
from pathlib import Path

from builder.formats.base import Format, register


def export(job) -> tuple[Path, str]:
    from builder.convert import torch2exported

    dst = job.version_dir / "model.pt2"
    torch2exported.export(job.part, job.example, dst, job.variant.precision)
    return dst, job.rebuild


def runner(path: Path, sig, precision: str, device: str):
    from builder import verify

    return verify.TorchRunner(path, [t.name for t in sig.inputs], [t.name for t in sig.outputs], precision, device)


def parameters(job, path: Path) -> dict:
    """Runner settings of a torch variant: which tensors carry the sequence axis, graph buckets, compile."""
    from builder.families import TOKEN_KINDS

    variant, sig, serving = job.variant, job.sig, job.serving
    seq_inputs = [t.name for t in sig.inputs if t.kind in TOKEN_KINDS]
    seq_outputs = [t.name for t in sig.outputs if seq_inputs and sig.max_batch_size > 0 and t.dims[:1] == (-1,)]
    params = {"seq_inputs": ",".join(seq_inputs), "seq_outputs": ",".join(seq_outputs), "compile": variant.compile,
              "cuda_graphs": "1" if variant.cuda_graphs else "0"}
    if serving["instances"].kind == "gpu":  # an input already on the GPU stays there (the runner takes it by DLPack)
        params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    if variant.cuda_graphs:
        mbs = max(sig.max_batch_size, 1)
        db = serving["dynamic_batching"]
        buckets = {1, mbs} | {2 ** i for i in range(12) if 2 ** i < mbs} | set(db.preferred_batch_sizes if db else [])
        params["batch_buckets"] = ",".join(str(b) for b in sorted(buckets))
        params["seq_buckets"] = ",".join(str(b) for b in job.model.shapes.buckets()) if seq_inputs else ""
        params["example_shapes"] = json.dumps({t.name: [list(t.dims), t.dtype] for t in sig.inputs})
    return params


TORCH = register(Format(name="torch", artifact="model.pt2", export=export, runner=runner, python_runner="torch",
                        parameters=parameters, options=("cuda_graphs", "compile"),
                        refused={p: f"weight-only {p} (torchao) is the generation endpoint's; use format onnx for {p}"
                                 for p in ("int8", "int4")}))
