"""The tidy results table (one row per model variant and concurrency) and the run's manifest.

A results directory holds:
  results.csv     the table below (results.parquet too when pyarrow is importable)
  manifest.json   versions, machine, perf_analyzer commands, start/end, complete, and per variant
                  its model, format, precision and the build's verification numbers, so that the
                  report needs nothing but this directory
  inputs/         the --input-data JSON given to perf_analyzer, per variant
  raw/            every perf_analyzer invocation: command.txt, its CSV, stdout and stderr
  repeats.csv     with --repeats N only: every repeat's rows (results.csv keeps the median one)
  steps.csv       ensembles only: per measured level, each composing model's average queue and
                  compute time per request (from Triton's statistics) and its share of their sum
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import urllib.request
from datetime import datetime
from pathlib import Path

import pandas as pd

from builder import versions
from builder.errors import RunError, UserError
from builder.perf.analyzer import LevelResult

DEFAULT_RESULTS = Path("perf/results")
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
RUN_MANIFEST = "manifest.json"
STEPS_CSV = "steps.csv"
REPEATS_CSV = "repeats.csv"  # perf --repeats N: every repeat's rows, column `repeat` added
STEP_COLUMNS = ["run", "variant", "concurrency", "step", "requests", "avg_queue_ms", "avg_compute_ms", "share"]

COLUMNS = [
    "run", "model", "variant", "format", "precision", "concurrency", "batch_size",
    "throughput", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "avg_ms",
    "client_send_ms", "network_ms", "server_queue_ms", "server_compute_input_ms",
    "server_compute_infer_ms", "server_compute_output_ms", "client_recv_ms",
    "stable", "attempts", "status",
    "server_cpu_pct", "gpu_util_pct", "gpu_mem_mb",  # sampled during the level (builder.diagnose.usage)
]
OPTIONAL_COLUMNS = ("server_cpu_pct", "gpu_util_pct", "gpu_mem_mb")  # absent from older results: read as empty
# status: ok (stable) | unstable (numbers from a relaxed try) | missing (no numbers) |
#         failed (perf_analyzer or the server failed) | not_run (the run stopped before it)
STATUSES = ("ok", "unstable", "missing", "failed", "not_run")
LATENCY_FIELDS = [c for c in COLUMNS if c.endswith("_ms")]


def level_row(level: LevelResult, *, run: str, model: str, variant: str, format: str, precision: str,
              batch_size: int, usage: dict | None = None) -> dict:
    """One table row from one measured level: microseconds become milliseconds."""
    values = level.values
    row = {"run": run, "model": model, "variant": variant, "format": format, "precision": precision,
           "concurrency": level.concurrency, "batch_size": batch_size,
           "throughput": values.get("throughput", float("nan"))}
    for name in LATENCY_FIELDS:
        us = values.get(name[: -len("_ms")] + "_us")
        row[name] = us / 1000.0 if us is not None else float("nan")
    row.update(stable=bool(level.stable), attempts=int(level.attempts), status=level.status)
    row.update({name: float((usage or {}).get(name, float("nan"))) for name in OPTIONAL_COLUMNS})
    return row


def not_run_rows(levels, *, run: str, model: str, variant: str, format: str, precision: str,
                 batch_size: int) -> list[dict]:
    """Placeholder rows for levels never measured because the run stopped first."""
    return [level_row(LevelResult(c, status="not_run"), run=run, model=model, variant=variant,
                      format=format, precision=precision, batch_size=batch_size) for c in levels]


def step_stats(stats: dict) -> dict[str, tuple[int, int, int]]:
    """model name -> (success.count, queue.ns, compute_infer.ns) from get_inference_statistics(as_json=True)."""
    out = {}
    for model in stats.get("model_stats", []):
        inference = model.get("inference_stats", {})

        def number(key: str, field: str) -> int:
            return int(inference.get(key, {}).get(field, 0) or 0)

        counts = out.get(model["name"], (0, 0, 0))  # several versions: summed
        out[model["name"]] = (counts[0] + number("success", "count"), counts[1] + number("queue", "ns"),
                              counts[2] + number("compute_infer", "ns"))
    return out


def step_rows(before: dict, after: dict, steps: list[str], *, run: str, variant: str, concurrency: int) -> list[dict]:
    """Per step of an ensemble, the average queue and compute ms per request between two snapshots of
    `step_stats`, and the step's share of the steps' total (queue + compute)."""
    rows = []
    for step in steps:
        b, a = before.get(step, (0, 0, 0)), after.get(step, (0, 0, 0))
        count, queue, compute = (a[i] - b[i] for i in range(3))
        rows.append({"run": run, "variant": variant, "concurrency": int(concurrency), "step": step, "requests": count,
                     "avg_queue_ms": queue / count / 1e6 if count > 0 else float("nan"),
                     "avg_compute_ms": compute / count / 1e6 if count > 0 else float("nan")})
    total = sum(r["avg_queue_ms"] + r["avg_compute_ms"] for r in rows if r["requests"] > 0)
    for r in rows:
        r["share"] = (r["avg_queue_ms"] + r["avg_compute_ms"]) / total if total > 0 and r["requests"] > 0 else float("nan")
    return rows


def save_steps(results_dir: Path, rows: list[dict]) -> Path | None:
    """Write steps.csv (only when some ensemble was measured)."""
    if not rows:
        return None
    path = Path(results_dir) / STEPS_CSV
    pd.DataFrame(rows, columns=STEP_COLUMNS).to_csv(path, index=False)
    return path


def load_steps(results_dir: Path) -> pd.DataFrame | None:
    path = Path(results_dir) / STEPS_CSV
    return pd.read_csv(path) if path.is_file() else None


def to_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if frame.empty:
        return frame
    frame = frame.astype({"concurrency": int, "batch_size": int, "attempts": int, "stable": bool})
    for name in ["throughput", *LATENCY_FIELDS, *OPTIONAL_COLUMNS]:
        frame[name] = frame[name].astype(float)
    return frame.sort_values(["model", "variant", "concurrency"], kind="stable").reset_index(drop=True)


def parquet_available() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def save_results(results_dir: Path, table: pd.DataFrame, manifest: dict) -> list[Path]:
    """Write results.csv (+ results.parquet when pyarrow is importable) and manifest.json."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    written = [results_dir / RESULTS_CSV]
    table.to_csv(written[0], index=False)
    if parquet_available():
        table.to_parquet(results_dir / RESULTS_PARQUET, index=False)
        written.append(results_dir / RESULTS_PARQUET)
    manifest_path = results_dir / RUN_MANIFEST
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    tmp.replace(manifest_path)
    written.append(manifest_path)
    return written


def load_results(results_dir: Path) -> tuple[pd.DataFrame, dict]:
    """The table and manifest of a results directory."""
    results_dir = Path(results_dir)
    csv_path, manifest_path = results_dir / RESULTS_CSV, results_dir / RUN_MANIFEST
    for path in (csv_path, manifest_path):
        if not path.is_file():
            raise UserError(f"{results_dir}: no {path.name} here; run 'triton-builder perf' to make a results directory")
    table = pd.read_csv(csv_path)
    for name in OPTIONAL_COLUMNS:
        if name not in table.columns:
            table[name] = float("nan")
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"{csv_path}: not a triton-builder results table (missing {', '.join(missing)})")
    table["stable"] = table["stable"].astype(str).str.lower().isin(["true", "1"])
    table["format"] = table["format"].fillna("").astype(str)
    table["precision"] = table["precision"].fillna("").astype(str)
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{manifest_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    return table, manifest


# --------------------------------------------------------------------------- provenance

def tool_versions() -> dict[str, str]:
    return versions.tool_versions(("tritonclient", "perf-analyzer", "nvidia-pytriton", "nvidia-cuda-runtime-cu12",
                                   "numpy", "pandas", "torch", "onnxruntime", "transformers"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def machine_info() -> dict:
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "libc": " ".join(platform.libc_ver()).strip(),
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": _gpus(),
    }


# --------------------------------------------------------------------------- a run's directory and records

def variant_record(name: str, entry: dict) -> dict:
    """What the report needs from the build manifest, copied so the results dir stands alone."""
    return {
        "model": entry.get("model", name),
        "format": entry.get("format", ""),
        "precision": entry.get("precision", ""),
        "part": entry.get("part", ""),  # CLIP: "text" / "image"; the report compares a tower with its own baseline
        "role": entry.get("role", "variant"),
        "status": entry.get("status"),
        "verification": entry.get("verification"),
        **({"steps": list(entry["steps"])} if entry.get("steps") else {}),
    }


def new_results_dir(out: Path | None, started: datetime) -> Path:
    """`out` (refused if it holds results already), else a fresh perf/results/<UTC stamp>."""
    if out is not None:
        out = Path(out)
        if (out / "results.csv").exists():
            raise UserError(f"{out}: already holds results; choose another --out directory")
        out.mkdir(parents=True, exist_ok=True)
        return out
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    for i in range(100):
        candidate = DEFAULT_RESULTS / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise RunError(f"{DEFAULT_RESULTS}: could not make a fresh results directory for {stamp}")


def server_version(http_url: str | None) -> str | None:
    if not http_url:
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{http_url}/v2", timeout=2) as response:
            return json.loads(response.read()).get("version")
    except (OSError, ValueError):
        return None


def server_record(server) -> dict:
    record = {key: getattr(server, key, None) for key in ("runtime", "http_url", "grpc_url", "metrics_url", "image")}
    command = getattr(server, "command", None)
    record["command"] = list(command) if command else None
    record["version"] = server_version(record["http_url"])
    return record
