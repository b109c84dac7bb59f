"""The python-backend runner's own work per batch, in-process: `execute()` of templates/python/runner.py
on one batch of N BERT-shaped requests (3 x [1, seq] int64, a [768] fp32 answer each), against another
version of the runner (default: git's 3799413, before issue 14).

triton_python_backend_utils is replaced by a stand-in whose tensors cost nothing, so what is timed is the
runner's Python and torch/numpy work (fetching, checks, joining, device copies, splitting, building the
responses) around a model that costs almost nothing; the stub's IPC and Triton's serialization are not
in it. `--device gpu` runs the same on a GPU (torch runner on cuda:0, pinned joins, one copy back).

    python perf/gpu/execute_overhead.py [--requests 64] [--seq 128] [--device cpu|gpu] [--base REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def stand_in() -> types.ModuleType:
    """triton_python_backend_utils with tensors that only hold their value."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def as_numpy(self):
            return self.value

        def to_dlpack(self):
            return self.value.__dlpack__()

        @classmethod
        def from_dlpack(cls, name, capsule):
            return cls(name, capsule)

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors, error

    class TritonError(Exception):
        INVALID_ARG = 3

        def __init__(self, message, code=None):
            super().__init__(message)

    pb.Tensor, pb.InferenceResponse, pb.TritonError, pb.TritonModelException = Tensor, InferenceResponse, TritonError, RuntimeError
    pb.get_input_tensor_by_name = lambda request, name: request[name]
    pb.triton_string_to_numpy = lambda t: {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}[t]
    return pb


def artifact(path: Path) -> None:
    """An ExportedProgram that costs almost nothing: [B, seq] ids -> [B, 768]."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(768))

        def forward(self, ids, mask, types_):
            return ((ids[:, :1] + mask[:, :1] + types_[:, :1]).float() * self.w,)

    ids = torch.ones(2, 16, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=512)
    shapes = ({0: batch, 1: seq},) * 3
    torch.export.save(torch.export.export(Tiny(), (ids, ids, ids), dynamic_shapes=shapes), str(path))


def load_runner(source: bytes, where: Path, tag: str):
    path = where / f"runner_{tag}.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(f"runner_{tag}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_of(module, where: Path, device: str):
    config = {"max_batch_size": 128,
              "input": [{"name": n, "data_type": "TYPE_INT64"} for n in NAMES],
              "output": [{"name": "embedding", "data_type": "TYPE_FP32"}],
              "parameters": {k: {"string_value": v} for k, v in {
                  "runner": "torch", "artifact": "model.pt2", "precision": "fp32", "device": device, "threads": "1",
                  "seq_inputs": ",".join(NAMES), "seq_outputs": "", "compile": "none", "cuda_graphs": "0",
                  "input_limits": json.dumps({"input_ids": {"max_dims": [512], "high": 30522}})}.items()}}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(where), "model_version": "1",
                      "model_instance_kind": "GPU" if device == "gpu" else "CPU", "model_instance_device_id": "0"})
    return model


def timed(model, requests: list, repeats: int) -> float:
    for _ in range(5):
        answers = model.execute(requests)
    assert all(a.error is None for a in answers), [a.error for a in answers]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.execute(requests)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--base", default="3799413", help="git revision of the runner to compare with")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    sys.modules["triton_python_backend_utils"] = pb = stand_in()
    base = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.base}:templates/python/runner.py"],
                          capture_output=True, check=True).stdout
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        (where / "1").mkdir()
        artifact(where / "1" / "model.pt2")
        print(f"runner execute() per batch, median of {args.rounds} rounds of {args.repeats}, device {args.device}, seq {args.seq}")
        for n in sorted({1, args.requests}):
            requests = [{name: pb.Tensor(name, rng.integers(1, 30522, (1, args.seq)).astype(np.int64)) for name in NAMES}
                        for _ in range(n)]
            models = {tag: model_of(load_runner(source, where, tag), where, args.device)
                      for tag, source in (("base", base), ("new", (ROOT / "templates/python/runner.py").read_bytes()))}
            rounds = {tag: [] for tag in models}
            for _ in range(args.rounds):  # alternating, so that a change of load hits both alike
                for tag, model in models.items():
                    rounds[tag].append(timed(model, requests, args.repeats))
            row = {tag: statistics.median(times) for tag, times in rounds.items()}
            print(f"  {n:4d} requests: base {row['base']:.3f} ms ({row['base'] / n * 1e3:.1f} us/request), "
                  f"new {row['new']:.3f} ms ({row['new'] / n * 1e3:.1f} us/request), {row['base'] / row['new']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
