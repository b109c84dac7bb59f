"""What the python backend's own calls cost per request, measured inside the real stub (the embedded
Triton from nvidia-pytriton): fetching an input, reading it as numpy or through DLPack, making an output
tensor from numpy or from DLPack, making a response. One probe model times each call 2,000 times in
its `execute` and answers with the microseconds per call.

    python perf/gpu/stub_calls.py [--tritonserver BIN --stub-python PY]   (PYTHONPATH at the checkout;
    starts and stops its own server; on the GPU machine give the two paths perf/gpu/bench.sh gives bench.py)
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np

CONFIG = """name: "probe"
backend: "python"
max_batch_size: 8
input [ { name: "X", data_type: TYPE_INT64, dims: [ 128 ] } ]
output [ { name: "T", data_type: TYPE_FP64, dims: [ 6 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

PROBE = '''
import time
import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack


def per_call(f, n=2000):
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e6


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            t = pb_utils.get_input_tensor_by_name(r, "X")
            emb = torch.randn(1, 768)
            arr = emb.numpy()
            times = [per_call(lambda: pb_utils.get_input_tensor_by_name(r, "X")),
                     per_call(lambda: t.as_numpy()),
                     per_call(lambda: from_dlpack(t.to_dlpack())),
                     per_call(lambda: pb_utils.Tensor("E", np.ascontiguousarray(arr.astype(np.float32, copy=False)))),
                     per_call(lambda: pb_utils.Tensor.from_dlpack("E", to_dlpack(emb))),
                     per_call(lambda: pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("E", arr)]))]
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("T", np.array([times]))]))
        return out
'''
CALLS = ("get_input_tensor_by_name", "as_numpy", "to_dlpack + torch from_dlpack", "Tensor(name, numpy)",
         "Tensor.from_dlpack(name, torch)", "InferenceResponse of one tensor")


@contextlib.contextmanager
def probe_server(config: str, model_py: str, tritonserver: Path | None, stub_python: Path | None):
    """A server (builder.runtime.start_server) over a temporary repository holding one python model, "probe"."""
    from builder.runtime import start_server

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        (repo / "probe" / "1").mkdir(parents=True)
        (repo / "probe" / "config.pbtxt").write_text(config)
        (repo / "probe" / "1" / "model.py").write_text(model_py)
        with start_server(repo, tritonserver=tritonserver, stub_python=stub_python) as server:
            yield server


def main() -> int:
    import argparse

    import tritonclient.http as httpclient

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tritonserver", type=Path)
    p.add_argument("--stub-python", type=Path)
    args = p.parse_args()
    with probe_server(CONFIG, PROBE, args.tritonserver, args.stub_python) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        x = httpclient.InferInput("X", [1, 128], "INT64")
        x.set_data_from_numpy(np.ones((1, 128), np.int64))
        runs = np.array([client.infer("probe", [x]).as_numpy("T")[0] for _ in range(5)])
        client.close()
    print("microseconds per call inside the stub (median of 5 x 2,000 calls):")
    for name, value in zip(CALLS, np.median(runs, axis=0)):
        print(f"  {name:34s} {value:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
