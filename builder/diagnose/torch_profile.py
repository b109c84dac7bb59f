"""Torch (ExportedProgram) variants in-process: torch.profiler's operator breakdown and trace, kernel-busy
time on a GPU, FLOPs from torch.utils.flop_counter, peak memory (see builder.diagnose.profile)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from builder.diagnose.records import Run, VariantProfile, category, shares
from builder.manifest import signature_of
from builder.signature import make_inputs

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
            vp.runs.append(Run(batch, ms, ops, shares(ops), flops, traffic, peak, trace,
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
