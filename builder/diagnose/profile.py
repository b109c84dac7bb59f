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
device, precision and thread count from the variant's config.pbtxt, as the server runs it. This module
reads the repository, measures the device's peaks and runs the command; torch_profile.py and
onnx_profile.py profile the variants, records.py holds what they measure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from builder.diagnose.advice import advise
from builder.diagnose.onnx_profile import profile_onnx
from builder.diagnose.records import VariantProfile
from builder.diagnose.report import write_profile_report
from builder.diagnose.torch_profile import profile_torch
from builder.errors import UserError
from builder.manifest import read_manifest


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


PROFILERS = {"torch": profile_torch, "onnx": profile_onnx}  # format -> its in-process profiler


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
