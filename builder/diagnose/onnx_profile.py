"""ONNX variants in-process: onnxruntime's own profiler for the operator breakdown and trace, FLOPs of the
matmul-family nodes and bytes from the shapes it records (see builder.diagnose.profile)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from builder.diagnose.records import Run, VariantProfile, category, shares
from builder.manifest import signature_of
from builder.signature import make_inputs

_ORT_BYTES = {"float": 4, "float16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1, "double": 8}


def _ort_node_numbers(args: dict) -> tuple[float, float]:
    """(FLOPs of a matmul-family node, bytes of its inputs + outputs) from the profiler's recorded shapes."""
    def shapes(key):
        out = []
        for item in args.get(key, []):
            for dtype, shape in item.items():
                out.append((dtype, [int(d) for d in shape]))
        return out

    ins, outs = shapes("input_type_shape"), shapes("output_type_shape")
    traffic = sum(_ORT_BYTES.get(dt, 4) * float(np.prod(s)) for dt, s in ins + outs if s is not None)
    op = args.get("op_name", "")
    flops = 0.0
    if re.search(r"matmul|gemm", op, re.I) and ins and outs and ins[0][1]:
        k = ins[0][1][-1]
        if op == "Gemm" and args.get("transA") == 1:
            k = ins[0][1][0]
        flops = 2.0 * float(np.prod(outs[0][1])) * k
    return flops, traffic


def profile_onnx(entry_dir: Path, entry: dict, config: dict, batches: list[int], out: Path, name: str,
                 iters: int) -> VariantProfile:
    import onnxruntime as ort

    sig = signature_of(entry)
    params = config["params"]
    threads = int(params.get("threads", "0") or 0)
    device = "gpu" if config["kind"] == "gpu" and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    vp = VariantProfile(name, entry.get("model", name), "onnx", entry.get("precision", "fp32"),
                        "cuda" if device == "gpu" else "cpu", threads, config["instances"], config=config)
    path = entry_dir / "1" / params.get("artifact", "model.onnx")
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    vp.weights_bytes = float(sum(len(t.raw_data) or 0 for t in model.graph.initializer)) or None
    del model
    providers = (["CUDAExecutionProvider"] if device == "gpu" else []) + ["CPUExecutionProvider"]

    def session(profiling: bool, n_threads: int):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if n_threads:
            opts.intra_op_num_threads = n_threads
        if profiling:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(out / f"{name}_ort")
        return ort.InferenceSession(str(path), opts, providers=providers)

    def feeds_for(batch, sess):
        wanted = {i.name for i in sess.get_inputs()}
        return {k: v for k, v in make_inputs(sig, batch, rng=np.random.default_rng(batch)).items() if k in wanted}

    for batch in batches:
        plain = session(False, threads)
        feeds = feeds_for(batch, plain)
        for _ in range(3):
            plain.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(iters):
            plain.run(None, feeds)
        ms = (time.perf_counter() - t0) / iters * 1000
        prof = session(True, threads)
        for _ in range(3):
            prof.run(None, feeds)
        produced = Path(prof.end_profiling())
        events = json.loads(produced.read_text())
        trace = f"{name}_b{batch}.trace.json"
        (out / trace).write_text(json.dumps({"traceEvents": events}))
        produced.unlink()
        # the last of the 3 profiled runs: its node events (each node's *_kernel_time)
        runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
        last = runs[-1] if runs else None
        nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                 and (last is None or last["ts"] <= e["ts"] <= last["ts"] + last["dur"])]
        per_op: dict[str, dict] = {}
        flops = traffic = 0.0
        for e in nodes:
            op = e.get("args", {}).get("op_name", e["name"])
            f, b = _ort_node_numbers(e.get("args", {}))
            flops, traffic = flops + f, traffic + b
            o = per_op.setdefault(op, {"name": op, "category": category(op), "calls": 0, "self_us": 0.0})
            o["calls"] += 1
            o["self_us"] += float(e.get("dur", 0))
        ops = sorted(per_op.values(), key=lambda o: -o["self_us"])
        vp.runs.append(Run(batch, ms, ops, shares(ops), flops or None, traffic or None, None, trace,
                           ops_per_forward=float(len(nodes)) or None))
    if device == "cpu" and batches:
        sess = session(False, os.cpu_count() or 1)
        feeds = feeds_for(batches[-1], sess)
        sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(iters):
            sess.run(None, feeds)
        vp.all_threads_ms = (time.perf_counter() - t0) / iters * 1000
    return vp
