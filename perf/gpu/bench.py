"""GPU benchmark driver: build the bench spec, serve it on the GPU with the bundled Triton, self-check
every model over gRPC, run perf_analyzer at several concurrencies, write the table, report and plots,
and the targets met or missed (perf/gpu/targets.py -> targets.md).

Run through perf/gpu/bench.sh (it prepares the environment from .bundle/); results go to --out as at
most 8 files: report.md, targets.md, results.csv, selfcheck.json, env.json, results.tar.gz (everything,
plots included) and the log.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--spec", type=Path, default=HERE / "bench.yaml")
    p.add_argument("--tritonserver", type=Path, required=True)
    p.add_argument("--stub-python", type=Path, required=True)
    p.add_argument("--concurrency", default="1,64,128,192,256")
    p.add_argument("--measurement-ms", type=int, default=1000)
    p.add_argument("--models", default="", help="comma-separated Triton models to measure (default: all)")
    p.add_argument("--skip", default="clip_u8_text_torch_fp16_graphs,clip_image_torch_fp16_graphs,clip_text_torch_fp32",
                   help="comma-separated Triton models not to measure (clip_u8's text tower is clip's again; the fp16 "
                        "image tower fed fp32 pixels stalls perf_analyzer at c=128 and no target reads it; the "
                        "eager text tower neither)")
    p.add_argument("--latency-budget-ms", type=float, default=50.0)
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="perf_analyzer's protocol")
    p.add_argument("--kernel-models", default="bert_torch_fp32,bert_torch_bf16_inductor_graphs,"
                                              "clip_u8_image_torch_fp16_graphs",
                   help="models whose GPU time per batch is measured in-process (what bounds the served numbers)")
    args = p.parse_args()

    from builder.build import build
    from builder.errors import RunError
    from builder.perf import run_perf, write_report
    from builder.runtime import self_check, start_server

    t0 = time.time()
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "argv": sys.argv}
    # the python backend moves every batch through /dev/shm: its size is a suspect for the image tower that
    # stopped answering at high concurrency (runs 4, 5, 10), so it is recorded, and what is left after the run
    env["dev_shm_mb"] = {"total": shutil.disk_usage("/dev/shm").total // 2**20}
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        import torch
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
    except Exception as exc:  # record what could not be read, keep measuring
        env["env_error"] = repr(exc)
    repo = work / "repo"
    result = build(args.spec, repo, keep_going=True)
    env["build_seconds"] = round(time.time() - t0, 1)
    env["build"] = [{"model": r.triton_name, "status": r.status, "cosine": r.worst_cosine, "seconds": round(r.seconds, 1)}
                    for r in result.results]
    results_dir = work / "results"
    skip = {m for m in args.skip.split(",") if m}
    models = [m for m in args.models.split(",") if m] or None
    if skip:
        from builder.manifest import read_manifest
        from builder.perf.run import select_variants

        models = [m for m in models or select_variants(read_manifest(repo), None) if m not in skip]
    # each instance logs every second where its batches' time went inside `execute` (templates/python/runner.py's
    # clock): set against "compute infer" per batch, the rest is the python backend's own per-request work
    os.environ.setdefault("TRITON_BUILDER_CLOCK", "1")
    with start_server(repo, tritonserver=args.tritonserver, stub_python=args.stub_python, gpus=True,
                      ready_timeout=600, log_path=work / "tritonserver.log") as server:
        env["server_ready_seconds"] = round(time.time() - t0, 1)
        try:
            checks = self_check(server, repo, protocol="grpc")
            (out / "selfcheck.json").write_text(json.dumps([c.__dict__ for c in checks], indent=1))
        except Exception as exc:
            (out / "selfcheck.json").write_text(json.dumps({"error": str(exc)}, indent=1))
            print(f"self-check failed: {exc}", file=sys.stderr)
        try:  # keep_going: a level that times out (the CLIP image tower at high concurrency) does not end the bench
            run_perf(repo, server=server, models=models, concurrency=[int(c) for c in args.concurrency.split(",")],
                     out=results_dir, measurement_ms=args.measurement_ms, protocol=args.protocol, keep_going=True)
        except RunError as exc:  # the failed levels are in results.csv; report what was measured
            env["perf_error"] = str(exc)
            print(f"perf: {exc}", file=sys.stderr, flush=True)
    env["execute_clock"] = execute_clock(work / "tritonserver.log")
    env["kernel_ms"] = kernel_times(repo, [m for m in args.kernel_models.split(",") if m])
    report = write_report(results_dir, latency_budget_ms=args.latency_budget_ms)
    import pandas as pd
    from targets import evaluate, markdown  # perf/gpu/targets.py (this script's folder is on sys.path)

    previous = HERE / "results-6" / "results.csv"
    verdicts = markdown(evaluate(pd.read_csv(results_dir / "results.csv"), pd.read_csv(previous)))
    (out / "targets.md").write_text(f"# GPU encoder targets (latency budget {args.latency_budget_ms:g} ms)\n\n{verdicts}")
    print(verdicts)
    env["total_seconds"] = round(time.time() - t0, 1)
    env["dev_shm_mb"]["free_after"] = shutil.disk_usage("/dev/shm").free // 2**20
    (out / "env.json").write_text(json.dumps(env, indent=1))
    shutil.copy2(report, out / "report.md")
    shutil.copy2(results_dir / "results.csv", out / "results.csv")
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        tar.add(results_dir, arcname="results")
        if (work / "tritonserver.log").exists():
            tar.add(work / "tritonserver.log", arcname="tritonserver.log")
    print(f"bench done in {env['total_seconds']} s: {out}")
    return 0


CLOCK = re.compile(r"^I\d{4} (\d\d:\d\d:\d\d)\.\d+ .*execute clock of (\S+) \([^)]*\): (\d+) batches, ([\d.]+) rows "
                   r"a batch; ms a batch: (.*?)\"?$")


def execute_clock(log: Path) -> dict[str, list[dict]]:
    """The runner's clock lines (one per instance per second under load), per model: time, batches, rows a
    batch and ms a batch in each phase."""
    clock: dict[str, list[dict]] = {}
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if m := CLOCK.match(line):
            phases = {k: float(v) for k, v in (part.rsplit(" ", 1) for part in m[5].split(", "))}
            clock.setdefault(m[2], []).append({"time": m[1], "batches": int(m[3]), "rows": float(m[4]), **phases})
    return clock


def kernel_times(repo: Path, models: list[str], batches=(1, 16, 64, 128), repeats: int = 20) -> dict:
    """GPU time of one forward per batch size, in-process, no server: the floor under the served latency.

    Eager variants run the program as served; graph variants replay a CUDA graph captured at that size."""
    import torch

    from builder.convert.torch2exported import DTYPES
    from builder.manifest import read_manifest, signature_of
    from builder.signature import make_inputs
    from builder.verify import load_program

    import numpy as np

    manifest = read_manifest(repo)["models"]
    out = {}
    for name in models:
        entry = manifest.get(name)
        if entry is None:
            continue
        sig = signature_of(entry)
        module = load_program(repo / name / "1" / "model.pt2", "cuda:0")
        dtype = getattr(torch, DTYPES[entry["precision"]])
        graphs = "graphs" in name
        times = {}
        for batch in batches:
            arrays = make_inputs(sig, batch, np.random.default_rng(0))
            args = [torch.from_numpy(arrays[t.name]).cuda() for t in sig.inputs]
            args = [a.to(dtype) if a.is_floating_point() else a for a in args]
            with torch.inference_mode():
                for _ in range(3):
                    module(*args)
                run = functools.partial(module, *args)
                if graphs:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        module(*args)
                    run = graph.replay
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(repeats):
                    run()
                end.record()
                torch.cuda.synchronize()
            times[batch] = round(start.elapsed_time(end) / repeats, 3)
        out[name] = times
        del module
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(main())
