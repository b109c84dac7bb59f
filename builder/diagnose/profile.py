"""`triton-builder profile REPO`: where a variant's time goes, in-process, on the device it is served on.

For every passed torch (ExportedProgram) and ONNX variant of a built repository:

- an operator breakdown: torch.profiler for torch variants, onnxruntime's own profiler for ONNX
  ones; the top operators by self time and the shares of matmul / attention / normalization /
  elementwise / copies / other; the trace (Chrome trace JSON) opens in Perfetto or chrome://tracing;
- launch- or compute-bound: on a GPU, kernel-busy time against wall time per forward (the gap is
  launch and host overhead); on the CPU, the mean time per operator and how the forward scales
  from the served thread count to every core;
- achieved FLOP/s and bytes/s against the device's peak, measured once here with a large matmul
  and a large copy: the roofline position. FLOPs: torch.utils.flop_counter for torch variants; for
  ONNX the matmul-family nodes (MatMul, Gemm, their integer and 4-bit forms) from the shapes
  onnxruntime's profiler records. Bytes: every operator's inputs plus outputs, with no cache reuse
  (an upper bound of the traffic, so the intensity is a lower bound);
- memory: weights, peak allocated during a forward (torch's allocator through the profiler), and
  its growth per batch element between batch 1 and the larger batch.

The inputs come from each model's signature in the manifest (builder.signature.make_inputs); the
device, precision and thread count from the variant's config.pbtxt, as the server runs it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from builder.diagnose.advice import advise
from builder.diagnose.records import CATEGORIES, Run, VariantProfile, category
from builder.diagnose.report import write_profile_report
from builder.errors import UserError
from builder.manifest import read_manifest, signature_of
from builder.signature import make_inputs

# --------------------------------------------------------------------------- reading the repository

def served_config(model_dir: Path) -> dict:
    """Parameters, instance group and dynamic batching of a variant's config.pbtxt (Triton's schema)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    params = {k: v.string_value for k, v in config.parameters.items()}
    group = config.instance_group[0] if config.instance_group else None
    return {
        "params": params,
        "instances": group.count if group else 1,
        "kind": "gpu" if group is not None and group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU else "cpu",
        "max_batch_size": config.max_batch_size,
        "preferred_batch_sizes": list(config.dynamic_batching.preferred_batch_size)
        if config.HasField("dynamic_batching") else [],
    }


def profiled_variants(manifest: dict, names: list[str] | None) -> dict[str, dict]:
    entries = manifest.get("models", {})
    if names:
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise UserError(f"--model {unknown[0]}: not in this repository; it has: {', '.join(sorted(entries))}")
        chosen = {n: entries[n] for n in names}
    else:
        chosen = {n: e for n, e in entries.items() if e.get("role", "variant") == "variant"}
    out = {}
    for name, entry in sorted(chosen.items()):
        if entry.get("role", "variant") != "variant" or entry.get("format") not in PROFILERS or "generation" in entry:
            if names:
                raise UserError(f"--model {name}: profile covers {' and '.join(PROFILERS)} variants "
                                f"({entry.get('role')} {entry.get('format', '')} is not one)")
            continue
        if entry.get("status") != "passed":
            if names:
                raise UserError(f"--model {name}: did not pass verification; nothing served to profile")
            continue
        out[name] = entry
    if not out:
        raise UserError("no passed torch or onnx variant to profile in this repository")
    return out


# --------------------------------------------------------------------------- device peaks

def measure_peak(device: str, dtype: str = "float32", threads: int = 0) -> dict:
    """A practical peak of this device: FLOP/s of a large matmul, bytes/s of a large copy."""
    import torch

    previous = torch.get_num_threads()
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    try:
        dt = getattr(torch, dtype if device != "cpu" else "float32")
        n = 2048 if device == "cpu" else 8192
        a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
        src = torch.empty(64 * 2**20 // 4 if device == "cpu" else 512 * 2**20 // 4, device=device)
        dst = torch.empty_like(src)

        def best(fn, reps):
            times = []
            for _ in range(reps):
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return min(times)

        best(lambda: a @ b, 1)
        flops = 2 * n**3 / best(lambda: a @ b, 5)  # the best of 5: the device when nothing else interrupts it
        best(lambda: dst.copy_(src), 1)
        bandwidth = 2 * src.numel() * src.element_size() / best(lambda: dst.copy_(src), 5)
    finally:
        torch.set_num_threads(previous)
    return {"flops": flops, "bytes_per_s": bandwidth,
            "how": f"measured here: {n}x{n} {str(dt).replace('torch.', '')} matmul, "
                   f"{src.numel() * 4 / 2**20:.0f} MB copy, {threads or previous} thread(s)" if device == "cpu"
                   else f"measured here: {n}x{n} {str(dt).replace('torch.', '')} matmul, {src.numel() * 4 / 2**20:.0f} MB copy"}


# --------------------------------------------------------------------------- torch variants

def _torch_counts(runner, feeds) -> tuple[float, float]:
    """(FLOPs, bytes of every aten op's inputs + outputs) of one forward."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import FlopCounterMode

    class Traffic(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket not in _VIEW_OPS:
                tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
                Traffic.total += sum(t.numel() * t.element_size() for t in tensors)
            return out

    _VIEW_OPS = {torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.expand, torch.ops.aten.t,
                 torch.ops.aten.transpose, torch.ops.aten.permute, torch.ops.aten.unsqueeze, torch.ops.aten.squeeze,
                 torch.ops.aten.slice, torch.ops.aten.select, torch.ops.aten.alias, torch.ops.aten.detach}
    counter = FlopCounterMode(display=False)
    with counter, Traffic():
        runner(feeds)
    return float(counter.get_total_flops()), float(Traffic.total)


def _peak_from_trace(trace: Path, device_type: int) -> float | None:
    """Highest 'Total Allocated' of the profiler's [memory] events for one device type (0 CPU, 1 CUDA)."""
    try:
        events = json.loads(trace.read_text()).get("traceEvents", [])
    except (OSError, ValueError):
        return None
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == device_type]
    return float(max(totals)) if totals else None


def profile_torch(entry_dir: Path, entry: dict, config: dict, batches: list[int], out: Path, name: str,
                  iters: int) -> VariantProfile:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from builder.verify import TorchRunner

    sig = signature_of(entry)
    params = config["params"]
    device = "gpu" if config["kind"] == "gpu" and torch.cuda.is_available() else "cpu"
    threads = int(params.get("threads", "0") or 0)
    vp = VariantProfile(name, entry.get("model", name), "torch", entry.get("precision", "fp32"),
                        "cuda" if device == "gpu" else "cpu", threads, config["instances"], config=config)
    if params.get("cuda_graphs") == "1" or params.get("compile", "none") != "none":
        vp.notes.append("profiled as the exported program, eagerly: the served CUDA graphs / torch.compile are not "
                        "applied here")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        runner = TorchRunner(entry_dir / "1" / params.get("artifact", "model.pt2"), [t.name for t in sig.inputs],
                             [t.name for t in sig.outputs], vp.precision, device)
        vp.weights_bytes = float(sum(t.numel() * t.element_size()
                                     for t in list(runner.module.parameters()) + list(runner.module.buffers())))
        gpu = runner.device != "cpu"

        def sync():
            if gpu:
                torch.cuda.synchronize()

        for batch in batches:
            feeds = make_inputs(sig, batch, rng=np.random.default_rng(batch))
            for _ in range(3):
                runner(feeds)
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                runner(feeds)
            sync()
            ms = (time.perf_counter() - t0) / iters * 1000
            flops, traffic = _torch_counts(runner, feeds)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            with profile(activities=activities, profile_memory=True) as prof:
                for _ in range(iters):
                    runner(feeds)
                sync()
            trace = f"{name}_b{batch}.trace.json"
            prof.export_chrome_trace(str(out / trace))
            ops, busy_us, calls = tally(prof.key_averages(), iters, gpu)
            peak = (torch.cuda.max_memory_allocated() if gpu else _peak_from_trace(out / trace, 0))
            vp.runs.append(Run(batch, ms, ops, _shares(ops), flops, traffic, peak, trace,
                               kernel_busy_ms=busy_us / 1000 if gpu else None, ops_per_forward=calls / iters))
        if not gpu and batches:  # the same forward with every core: does the work scale with threads?
            torch.set_num_threads(os.cpu_count() or 1)
            feeds = make_inputs(sig, batches[-1], rng=np.random.default_rng(0))
            runner(feeds)
            t0 = time.perf_counter()
            for _ in range(iters):
                runner(feeds)
            vp.all_threads_ms = (time.perf_counter() - t0) / iters * 1000
    finally:
        torch.set_num_threads(previous)
    return vp


def tally(events, iters: int, gpu: bool) -> tuple[list[dict], float, int]:
    """(operators by self time per forward, kernel-busy µs per forward, aten calls) from the profiler's
    averaged events. On the GPU an operator's self device time is the time of the kernels it launched, and
    the kernels are events of their own too (device type CUDA): busy time sums the kernels only, the
    operator table the operators only, so nothing counts twice (the first H100 profile did, and showed
    kernels busy 117 % of a forward)."""
    from torch.autograd import DeviceType

    ops, busy_us, calls = [], 0.0, 0
    for e in events:
        if gpu and e.device_type != DeviceType.CPU:
            busy_us += e.self_device_time_total / iters
            continue
        if getattr(e, "is_user_annotation", False):
            continue
        self_us = (e.self_device_time_total if gpu else e.self_cpu_time_total) / iters
        if e.key.startswith("aten::"):
            calls += e.count
        if self_us > 0 and not e.key.startswith(("ProfilerStep", "cuda", "Activity Buffer")):
            ops.append({"name": e.key, "category": category(e.key), "calls": e.count / iters, "self_us": self_us})
    ops.sort(key=lambda o: -o["self_us"])
    return ops, busy_us, calls


# --------------------------------------------------------------------------- onnx variants

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
        vp.runs.append(Run(batch, ms, ops, _shares(ops), flops or None, traffic or None, None, trace,
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


PROFILERS = {"torch": profile_torch, "onnx": profile_onnx}  # format -> its in-process profiler


def _shares(ops: list[dict]) -> dict[str, float]:
    total = sum(o["self_us"] for o in ops)
    return {c: (sum(o["self_us"] for o in ops if o["category"] == c) / total if total else 0.0) for c in CATEGORIES}


# --------------------------------------------------------------------------- the command

def profile_repository(repo: Path, *, models: list[str] | None = None, out: Path | None = None,
                       batches: list[int] | None = None, iters: int = 10, results: Path | None = None,
                       accuracy_budget: float | None = None, console=None) -> tuple[Path, list[VariantProfile], list]:
    """Profile the variants, write OUT/profile.md, profile.json and one trace per variant and batch.
    `results`: a perf results directory of this repository, for the advice rules that read the
    served breakdown. Returns (report path, profiles, advice)."""
    from rich.console import Console

    console = console or Console(stderr=True, highlight=False)
    repo = Path(repo)
    manifest = read_manifest(repo)
    variants = profiled_variants(manifest, models)
    if iters < 1:
        raise UserError(f"--iters {iters} must be >= 1")
    if out is None:
        out = Path("perf/results") / time.strftime("profile-%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = None
    if results is not None:
        from builder.perf.results import load_results

        table, _ = load_results(results)
    peaks: dict[tuple, dict] = {}
    profiles = []
    for name, entry in variants.items():
        config = served_config(repo / name)
        sizes = batches or sorted({1, min(8, max(config["max_batch_size"], 1))})
        if config["max_batch_size"] == 0:
            sizes = [1]
        console.print(f"profiling {name} ({entry.get('format')} {entry.get('precision')}, {config['kind']}) "
                      f"at batch {', '.join(map(str, sizes))}")
        vp = PROFILERS[entry["format"]](repo / name, entry, config, sizes, out, name, iters)
        key = (vp.device, vp.precision if vp.device != "cpu" else "fp32", vp.threads)
        if key not in peaks:
            console.print(f"  measuring the {vp.device} peak ({key[2] or 'default'} thread(s))")
            peaks[key] = measure_peak("cuda" if vp.device == "cuda" else "cpu",
                                      {"fp16": "float16", "bf16": "bfloat16"}.get(key[1], "float32"), vp.threads)
        profiles.append(vp)
    for key in peaks:  # measured again after the variants; the higher stands (other load on a shared machine)
        again = measure_peak("cuda" if key[0] == "cuda" else "cpu",
                             {"fp16": "float16", "bf16": "bfloat16"}.get(key[1], "float32"), key[2])
        peaks[key] = {**peaks[key], **{k: max(peaks[key][k], again[k]) for k in ("flops", "bytes_per_s")},
                      "how": peaks[key]["how"] + ", best of before and after the variants"}
    for vp in profiles:
        vp.peak = peaks[(vp.device, vp.precision if vp.device != "cpu" else "fp32", vp.threads)]
    tips = advise(profiles, manifest, table, accuracy_budget=accuracy_budget)
    (out / "profile.json").write_text(json.dumps({"repo": str(repo.resolve()), "profiles": [p.to_dict() for p in profiles],
                                                  "advice": [t.to_dict() for t in tips]}, indent=2, default=str) + "\n")
    path = write_profile_report(out, repo, profiles, tips)
    return path, profiles, tips
