"""What a streamed token costs the python backend (issue 11's served-vs-in-process gap), measured inside the
real stub (the embedded Triton from nvidia-pytriton) of a decoupled probe model: `is_cancelled()` on a
response sender, and `send()` of one streamed response with the four tensors the generation endpoint sends
(text_output, finish_reason, num_input_tokens, num_output_tokens) or with text_output alone. The probe runs
each call N times in a thread while the client reads the stream over gRPC, and answers with µs per call.

    python perf/gpu/stream_calls.py [--n 2000] [--tritonserver BIN --stub-python PY]
"""

from __future__ import annotations

import argparse
import queue
import sys
from pathlib import Path

import numpy as np

CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "N", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] },
         { name: "finish_reason", data_type: TYPE_STRING, dims: [ -1 ] },
         { name: "num_input_tokens", data_type: TYPE_INT32, dims: [ -1 ] },
         { name: "num_output_tokens", data_type: TYPE_INT32, dims: [ -1 ] },
         { name: "T", data_type: TYPE_FP64, dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

PROBE = '''
import threading
import time
import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def four(i):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([b" token"], dtype=np.object_)),
        pb_utils.Tensor("finish_reason", np.array([b""], dtype=np.object_)),
        pb_utils.Tensor("num_input_tokens", np.array([128], dtype=np.int32)),
        pb_utils.Tensor("num_output_tokens", np.array([i], dtype=np.int32))])


def one(i):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", np.array([b" token"], dtype=np.object_))])


def per_call(f, n):
    t0 = time.perf_counter()
    for i in range(n):
        f(i)
    return (time.perf_counter() - t0) / n * 1e6


def busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def spin_share(f, n):
    """Counts per ms a spinning thread makes while this one runs f n times (the GIL left to others)."""
    stop, count = threading.Event(), [0]

    def spin():
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    t0 = time.perf_counter()
    for i in range(n):
        f(i)
    elapsed = time.perf_counter() - t0
    stop.set()
    t.join()
    return count[0] / elapsed / 1e3


class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            n = int(pb_utils.get_input_tensor_by_name(r, "N").as_numpy()[0])
            threading.Thread(target=self.probe, args=(r.get_response_sender(), n)).start()
        return None

    def probe(self, sender, n):
        times = [per_call(lambda i: sender.is_cancelled(), n),
                 per_call(lambda i: four(i), n),
                 per_call(lambda i: sender.send(four(i)), n),
                 per_call(lambda i: sender.send(one(i)), n)]
        # does send() hold the GIL? A second thread counts in pure Python meanwhile (what the engine thread
        # needs the GIL for), against the same loop with a GIL-free wait and with Python busy work in its place
        times += [spin_share(lambda i: time.sleep(0.0002), n), spin_share(lambda i: busy(0.0002), n),
                  spin_share(lambda i: sender.send(four(i)), n)]
        sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("T", np.array(times))]), flags=FINAL)
'''
CALLS = ("sender.is_cancelled()", "response of 4 tensors (built, not sent)", "send(response of 4 tensors)",
         "send(response of text_output only)")
SPINS = ("a GIL-free wait (sleep 0.2 ms)", "Python busy work (0.2 ms)", "send(response of 4 tensors)")


def main() -> int:
    import tritonclient.grpc as grpcclient

    from stub_calls import probe_server  # beside this file

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tritonserver", type=Path)
    p.add_argument("--stub-python", type=Path)
    args = p.parse_args()
    runs = []
    with probe_server(CONFIG, PROBE, args.tritonserver, args.stub_python) as server:
        for _ in range(args.repeats):
            results: queue.Queue = queue.Queue()
            client = grpcclient.InferenceServerClient(server.grpc_url)
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            x = grpcclient.InferInput("N", [1], "INT32")
            x.set_data_from_numpy(np.array([args.n], np.int32))
            client.async_stream_infer("probe", [x], enable_empty_final_response=False)
            received = 0
            while True:
                result, error = results.get(timeout=300)
                if error is not None:
                    raise SystemExit(f"probe failed: {error}")
                received += 1
                times = result.as_numpy("T")
                if times is not None:
                    runs.append(times)
                    break
            client.stop_stream()
            client.close()
    print(f"microseconds per call inside the stub (median of {args.repeats} x {args.n} calls; "
          f"{received} streamed responses read in the last run):")
    medians = np.median(np.array(runs), axis=0)
    for name, value in zip(CALLS, medians):
        print(f"  {name:42s} {value:8.2f}")
    print("counts per ms of a second Python thread while the probe's thread loops over (more: the GIL was free):")
    for name, value in zip(SPINS, medians[len(CALLS):]):
        print(f"  {name:42s} {value:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
