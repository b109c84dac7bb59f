"""Admission control, measured: a python-backend model of known cost driven far above its capacity,
with and without a `queue_policy` (bounded queue + timeout, REJECT). Prints the p99 of accepted
requests and how fast rejections come back (docs/RELIABILITY.md quotes the output).

    PYTHONPATH=. .venv/bin/python perf/admission.py [--rate 400] [--seconds 10]

The config is rendered from templates/config.pbtxt.j2 through the spec's Serving settings, so what is
measured is what `build` writes. The load is open-loop (requests arrive at a fixed rate, as from many
independent users, whatever the answers), over gRPC, from this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def make_repo(root: Path, name: str, policy: dict | None, delay_ms: float, max_batch: int) -> Path:
    from test_perf_server import MODEL_PY, SIGNATURE, make_toy_repo

    from builder.render import model_config
    from builder.spec import DynamicBatching, Instances, QueuePolicy

    repo = make_toy_repo(root, {name: ("onnx", "fp32", delay_ms, 1.0)})
    sig = SIGNATURE.__class__(SIGNATURE.inputs, SIGNATURE.outputs, max_batch, SIGNATURE.extra)
    serving = dict(max_batch_size=max_batch, dynamic_batching=DynamicBatching(max_queue_delay_us=100),
                   instances=Instances(), warmup=False, queue_policy=QueuePolicy(**policy) if policy else None)
    text = model_config(name, sig, runtime="python", fmt="python", serving=serving,
                        parameters={"delay_ms": str(delay_ms)}, warmup=[])
    (repo / name / "config.pbtxt").write_text(text)
    (repo / name / "1" / "model.py").write_text(MODEL_PY)
    return repo


def drive(url: str, name: str, rate: float, seconds: float) -> list[tuple[float, bool, str]]:
    """Open loop: one request every 1/rate s for `seconds`, whatever the answers; then wait for them all."""
    import tritonclient.grpc as grpcclient

    ids = np.random.default_rng(0).integers(1, 100, size=(1, 16), dtype=np.int64)
    client = grpcclient.InferenceServerClient(url)
    inputs = [grpcclient.InferInput("input_ids", list(ids.shape), "INT64"),
              grpcclient.InferInput("attention_mask", list(ids.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(np.ones_like(ids))
    records: list[tuple[float, bool, str]] = []
    lock = threading.Lock()

    def done(sent: float):
        def callback(result=None, error=None):
            with lock:
                records.append((time.perf_counter() - sent, error is None,
                                "" if error is None else str(error).split("\n")[0][:80]))
        return callback

    t0 = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        wait = t0 + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        client.async_infer(name, inputs, done(time.perf_counter()))
    deadline = time.monotonic() + 120
    while len(records) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    client.close()
    return records


def summary(records, seconds: float) -> dict:
    ok = np.array([r[0] for r in records if r[1]]) * 1e3
    bad = np.array([r[0] for r in records if not r[1]]) * 1e3
    pct = lambda a, q: round(float(np.percentile(a, q)), 1) if len(a) else None  # noqa: E731
    errors = sorted({r[2] for r in records if not r[1]})
    return {"accepted_per_s": round(len(ok) / seconds, 1), "accepted_p50_ms": pct(ok, 50), "accepted_p99_ms": pct(ok, 99),
            "rejected_per_s": round(len(bad) / seconds, 1), "rejected_p50_ms": pct(bad, 50),
            "rejected_p99_ms": pct(bad, 99), "errors": errors[:2]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=400, help="requests/s sent (open loop); capacity is ~200")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--delay-ms", type=float, default=5.0, help="model cost per request (sleep)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-queue-size", type=int, default=8)
    p.add_argument("--timeout-us", type=int, default=100000)
    args = p.parse_args()

    from builder.runtime import start_server

    policy = {"max_queue_size": args.max_queue_size, "timeout_us": args.timeout_us}
    out = {"settings": vars(args)}
    for label, pol in (("no queue_policy", None), ("queue_policy", policy)):
        with tempfile.TemporaryDirectory() as tmp:
            repo = make_repo(Path(tmp) / "repo", "toy", pol, args.delay_ms, args.max_batch)
            with start_server(repo) as server:
                drive(server.grpc_url, "toy", 50, 1)  # warm
                out[label] = summary(drive(server.grpc_url, "toy", args.rate, args.seconds), args.seconds)
        print(f"{label}: {json.dumps(out[label])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
