"""perf_analyzer as data: find it, render its flags, run it, read its CSV.

Results are read only from the CSV that `-f` writes (with `--verbose-csv`, which adds the average
latency), never scraped from stdout. perf_analyzer stops a concurrency sweep at the first level that
does not stabilize: it then exits 0 or 2 and leaves that level (and the ones after it) out of its
CSV. `measure` checks one row per requested level, retries a missing level alone with a longer
window, and keeps a level that never stabilized as a row flagged `stable=False`.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from builder.errors import RunError, UserError

PROTOCOLS = ("grpc", "http")
UNSTABLE_MARK = "Failed to obtain stable measurement"
CSV_NAME = "perf.csv"

# perf_analyzer 2.50 CSV column (microseconds, except throughput) -> our field name
CSV_COLUMNS = {
    "Concurrency": "concurrency",
    "Inferences/Second": "throughput",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p95 latency": "p95_us",
    "p99 latency": "p99_us",
    "Avg latency": "avg_us",  # only with --verbose-csv
}
REQUIRED_COLUMNS = ("Concurrency", "Inferences/Second", "p50 latency", "p99 latency")


# --------------------------------------------------------------------------- finding the binary

def _dist_binary(dist: str) -> Path | None:
    try:
        files = importlib.metadata.files(dist) or []
        located = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "perf_analyzer":
            path = Path(located.locate_file(f)).resolve()
            if path.is_file() and os.access(path, os.X_OK) and not _is_script(path):
                return path
    return None


def _is_script(path: Path) -> bool:
    """A console-script wrapper (the `perf-analyzer` wheel's bin/perf_analyzer is Python that runs the real
    binary in a child): SIGINT stops the wrapper and kills its child before that prints what it measured."""
    with open(path, "rb") as f:
        return f.read(2) == b"#!"


def find_perf_analyzer(explicit: str | Path | None = None) -> Path:
    """The perf_analyzer binary: `explicit`, else PATH, else this venv's bin/, else the binary
    shipped by the `tritonclient` or `perf-analyzer` distribution."""
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UserError(f"perf_analyzer: {explicit} is not an executable file")
        return path
    on_path = shutil.which("perf_analyzer")
    if on_path and _is_script(Path(on_path)):  # the binary the wrapper runs, so that SIGINT reaches it
        on_path = next(filter(None, map(_dist_binary, ("perf-analyzer", "tritonclient"))), None) or on_path
    if on_path:
        return Path(on_path)
    venv_bin = Path(sys.executable).parent / "perf_analyzer"
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return venv_bin
    for dist in ("tritonclient", "perf-analyzer"):
        found = _dist_binary(dist)
        if found:
            return found
    raise UserError(
        "perf_analyzer not found: install 'tritonclient[all]==2.50.0' (its wheel ships the binary), "
        "put perf_analyzer on PATH, or pass its path explicitly"
    )


def cuda_runtime_lib_dir() -> Path | None:
    """The directory holding libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel, if installed."""
    try:
        files = importlib.metadata.files("nvidia-cuda-runtime-cu12") or []
        dist = importlib.metadata.distribution("nvidia-cuda-runtime-cu12")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libcudart.so"):
            return Path(dist.locate_file(f)).resolve().parent
    return None


def perf_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """perf_analyzer's environment: `base` (default os.environ) with the CUDA runtime wheel's lib
    directory first on LD_LIBRARY_PATH (the tritonclient binary links libcudart.so.12)."""
    env = dict(os.environ if base is None else base)
    lib = cuda_runtime_lib_dir()
    if lib is not None:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if str(lib) not in parts:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([str(lib), *parts])
    return env


def perf_analyzer_version(binary: Path) -> str:
    """A version string: the owning distribution's version (the binary's --version prints none)."""
    for dist in ("tritonclient", "perf-analyzer"):
        found = _dist_binary(dist)
        if found is not None and found == Path(binary).resolve():
            return f"{dist} {importlib.metadata.version(dist)}"
    return "unknown"


# --------------------------------------------------------------------------- flags as data

@dataclass(frozen=True)
class PerfFlags:
    """The perf_analyzer options this tool uses. `argv()` renders them; nothing else builds flags."""

    model: str  # -m
    url: str  # -u, host:port of the protocol's endpoint
    protocol: str = "grpc"  # -i
    concurrency: tuple[int, int, int] = (1, 1, 1)  # --concurrency-range start:end:step
    measurement_ms: int = 2000  # -p
    stability_pct: float = 25.0  # -s
    max_trials: int = 10  # -r
    input_data: str | None = None  # --input-data (a JSON file, "zero" or "random")
    csv_file: str = CSV_NAME  # -f, relative: with an absolute path an ensemble run writes no per-step CSVs
    batch_size: int = 1  # -b
    percentile: int | None = None  # --percentile: stabilize on this percentile instead of the average
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # --shape name:d1,d2
    verbose_csv: bool = True  # --verbose-csv: adds "Avg latency" to the CSV
    async_mode: bool = False  # -a

    def __post_init__(self) -> None:
        problems = []
        if not self.model:
            problems.append("model (-m) must not be empty")
        if ":" not in self.url or not self.url.rsplit(":", 1)[1].isdigit():
            problems.append(f"url (-u) {self.url!r} must be host:port")
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol (-i) {self.protocol!r} must be one of {', '.join(PROTOCOLS)}")
        conc = tuple(int(c) for c in self.concurrency)
        if len(conc) != 3:
            problems.append(f"concurrency {self.concurrency!r} must be (start, end, step)")
        elif conc[0] < 1 or conc[1] < conc[0] or conc[2] < 1:
            problems.append(f"concurrency {conc[0]}:{conc[1]}:{conc[2]} needs 1 <= start <= end and step >= 1")
        object.__setattr__(self, "concurrency", conc)
        if self.measurement_ms < 100:
            problems.append(f"measurement_ms (-p) {self.measurement_ms} must be >= 100")
        if not 0 < self.stability_pct <= 1000:
            problems.append(f"stability_pct (-s) {self.stability_pct} must be in (0, 1000]")
        if self.max_trials < 3:
            problems.append(f"max_trials (-r) {self.max_trials} must be >= 3 (stability needs 3 windows)")
        if self.batch_size < 1:
            problems.append(f"batch_size (-b) {self.batch_size} must be >= 1")
        if self.percentile is not None and not 1 <= self.percentile <= 99:
            problems.append(f"percentile {self.percentile} must be in [1, 99]")
        if os.path.isabs(self.csv_file) or os.sep in self.csv_file:
            problems.append(f"csv_file (-f) {self.csv_file!r} must be a bare file name (it is written in the working directory)")
        shapes = []
        for item in self.shapes:
            name, dims = item
            dims = tuple(int(d) for d in dims)
            if not name or not dims or any(d < 1 for d in dims):
                problems.append(f"shape {name!r}: {dims} must be a name and positive dims")
            shapes.append((name, dims))
        object.__setattr__(self, "shapes", tuple(shapes))
        if problems:
            raise UserError("perf_analyzer flags: " + "; ".join(problems))

    @property
    def levels(self) -> tuple[int, ...]:
        start, end, step = self.concurrency
        return tuple(range(start, end + 1, step))

    def argv(self, binary: str | Path = "perf_analyzer") -> list[str]:
        start, end, step = self.concurrency
        args = [
            str(binary),
            "-m", self.model,
            "-u", self.url,
            "-i", self.protocol,
            "--concurrency-range", f"{start}:{end}:{step}",
            "-p", str(self.measurement_ms),
            "-s", f"{self.stability_pct:g}",
            "-r", str(self.max_trials),
            "-b", str(self.batch_size),
            "-f", self.csv_file,
        ]
        if self.input_data is not None:
            args += ["--input-data", str(self.input_data)]
        if self.percentile is not None:
            args += ["--percentile", str(self.percentile)]
        for name, dims in self.shapes:
            args += ["--shape", f"{name}:{','.join(str(d) for d in dims)}"]
        if self.verbose_csv:
            args.append("--verbose-csv")
        if self.async_mode:
            args.append("-a")
        return args

    def timeout_s(self) -> float:
        """A generous wall-clock limit: every level may use all its trials, plus start-up slack."""
        per_level = self.measurement_ms / 1000 * (self.max_trials + 2) + 5
        return 30 + per_level * len(self.levels)


# --------------------------------------------------------------------------- reading the CSV

def parse_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a perf_analyzer `-f` CSV as dicts keyed by CSV_COLUMNS' names (values as printed)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise RunError(f"{path}: not a perf_analyzer concurrency CSV (missing columns {', '.join(missing)})")
        rows = []
        for raw in reader:
            if not raw.get("Concurrency"):
                continue
            row: dict[str, float] = {}
            for column, key in CSV_COLUMNS.items():
                value = raw.get(column)
                if value not in (None, ""):
                    row[key] = float(value)
            row["concurrency"] = int(row["concurrency"])
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- running

@dataclass
class Attempt:
    """One perf_analyzer invocation."""

    argv: list[str]
    cwd: Path
    returncode: int
    rows: list[dict[str, float]]
    unstable: bool  # perf_analyzer said it could not stabilize a level
    stderr_tail: str
    seconds: float

    @property
    def command(self) -> str:
        return f"cd {shlex.quote(str(self.cwd))} && " + shlex.join(self.argv)


@dataclass
class LevelResult:
    """The outcome for one concurrency level: values is empty when no numbers were obtained."""

    concurrency: int
    values: dict[str, float] = field(default_factory=dict)
    stable: bool = False
    attempts: int = 0
    status: str = "missing"  # ok | unstable | missing | failed | not_run


class PerfAnalyzerError(RunError):
    """perf_analyzer failed (not an instability): carries the levels measured before the failure."""

    def __init__(self, message: str, levels: list[LevelResult], attempts: list[Attempt]):
        super().__init__(message)
        self.levels = levels
        self.attempts = attempts


# At its time limit perf_analyzer gets SIGINT: it stops sending and waits for the requests in flight, then
# reports; a second SIGINT makes it exit at once (a server that stopped answering); then SIGKILL. Seconds to
# wait after each.
INTERRUPT_WAIT_S = (10.0, 5.0)


def _interrupt(proc: subprocess.Popen) -> tuple[str, str]:
    """Stop a perf_analyzer past its time limit and return what it printed (stdout, stderr)."""
    for wait in INTERRUPT_WAIT_S:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    return proc.communicate()


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join([ln for ln in text.strip().splitlines() if ln.strip()][-lines:])


def run_once(flags: PerfFlags, workdir: Path, *, binary: Path | None = None,
             env: dict[str, str] | None = None, timeout_s: float | None = None) -> Attempt:
    """Run perf_analyzer once in `workdir` (created), keeping its CSV, stdout and stderr there.

    Returns the attempt whether or not it stabilized; raises PerfAnalyzerError (no levels) when the
    process cannot run, times out, or fails for a reason other than instability.
    """
    binary = binary or find_perf_analyzer()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    csv_path = workdir / flags.csv_file
    csv_path.unlink(missing_ok=True)
    argv = flags.argv(binary)
    (workdir / "command.txt").write_text(shlex.join(argv) + "\n")
    timeout_s = timeout_s or flags.timeout_s()
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, cwd=workdir, env=env or perf_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as exc:
        raise PerfAnalyzerError(f"perf_analyzer could not start ({binary}): {exc}", [], []) from exc
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stdout, stderr = _interrupt(proc)  # interrupted, not killed, so what it measured before the limit is kept
        (workdir / "stdout.txt").write_text(stdout)
        (workdir / "stderr.txt").write_text(stderr)
        raise PerfAnalyzerError(
            f"perf_analyzer -m {flags.model} timed out after {timeout_s:.0f} s (interrupted; its output is in "
            f"{workdir})\n{_tail(stdout + stderr)}", [], []) from None
    seconds = time.monotonic() - started
    (workdir / "stdout.txt").write_text(stdout)
    (workdir / "stderr.txt").write_text(stderr)
    unstable = UNSTABLE_MARK in stderr or UNSTABLE_MARK in stdout
    rows = parse_csv(csv_path) if csv_path.is_file() else []
    attempt = Attempt(argv, workdir, proc.returncode, rows, unstable, _tail(stderr or stdout), seconds)
    if proc.returncode != 0 and not unstable:
        raise PerfAnalyzerError(
            f"perf_analyzer -m {flags.model} failed (exit {proc.returncode}); command in {workdir / 'command.txt'}\n"
            f"{attempt.stderr_tail}", [], [attempt])
    return attempt


def plan_ranges(levels: tuple[int, ...] | list[int]) -> list[tuple[int, int, int]]:
    """Split sorted distinct levels into (start, end, step) sweeps perf_analyzer can run as one."""
    levels = sorted(set(int(c) for c in levels))
    if not levels or levels[0] < 1:
        raise UserError(f"concurrency levels {levels} must be integers >= 1")
    ranges, i = [], 0
    while i < len(levels):
        if i + 1 == len(levels):
            ranges.append((levels[i], levels[i], 1))
            break
        step, j = levels[i + 1] - levels[i], i + 1
        while j + 1 < len(levels) and levels[j + 1] - levels[j] == step:
            j += 1
        ranges.append((levels[i], levels[j], step))
        i = j + 1
    return ranges


@dataclass
class Measurement:
    """Every requested level of one model, in order, plus every invocation that produced them."""

    model: str
    levels: list[LevelResult]
    attempts: list[Attempt]

    @property
    def complete(self) -> bool:
        return all(lv.status in ("ok", "unstable") for lv in self.levels)


def measure(flags: PerfFlags, levels: tuple[int, ...] | list[int], workdir: Path, *,
            max_attempts: int = 3, relaxed_stability_pct: float | None = 100.0, sweep: bool = False,
            binary: Path | None = None, env: dict[str, str] | None = None,
            on_level=None) -> Measurement:
    """Measure `flags.model` at each level; `flags.concurrency` is replaced per invocation.

    By default each level is its own perf_analyzer run, so a failure later on loses nothing already
    measured (perf_analyzer writes its CSV only at the end). `sweep=True` runs equally spaced levels
    as one `--concurrency-range` sweep instead.
    A level that comes back missing or unstable is rerun alone with double the window and more
    trials, up to `max_attempts` tries. If it never stabilizes and `relaxed_stability_pct` is set, a
    last try with that stability threshold records its numbers, flagged `stable=False`. `on_level`
    is called with each LevelResult once it is final. A failure other than instability raises
    PerfAnalyzerError carrying the levels finished so far.
    """
    binary = binary or find_perf_analyzer()
    env = env or perf_env()
    if max_attempts < 1:
        raise UserError(f"max_attempts {max_attempts} must be >= 1")
    results = {c: LevelResult(c) for c in sorted(set(int(c) for c in levels))}
    attempts: list[Attempt] = []

    def finish(level: LevelResult, row: dict | None, stable: bool) -> None:
        if row is not None:
            level.values = row
        level.stable = stable
        level.status = "ok" if stable else ("unstable" if level.values else "missing")
        if on_level:
            on_level(level)

    def run(f: PerfFlags, tag: str) -> Attempt:
        try:
            attempt = run_once(f, Path(workdir) / tag, binary=binary, env=env)
        except PerfAnalyzerError as exc:
            attempts.extend(exc.attempts)
            for lv in results.values():  # levels without numbers: tried and failed, or never reached
                if lv.status == "missing" and not lv.values:
                    lv.status = "failed" if lv.attempts else "not_run"
            raise PerfAnalyzerError(str(exc), list(results.values()), attempts) from exc
        attempts.append(attempt)
        return attempt

    # First pass: one run per level, or one sweep per equally spaced run of levels.
    retry: list[int] = []
    plan = plan_ranges(list(results)) if sweep else [(c, c, 1) for c in results]
    for start, end, step in plan:
        f = replace(flags, concurrency=(start, end, step))
        swept = f.levels
        for c in swept:
            results[c].attempts += 1
        attempt = run(f, f"c{start}_a1" if start == end else f"c{start}-{end}-{step}_a1")
        got = {int(r["concurrency"]): r for r in attempt.rows}
        for c in swept:
            if c in got:
                finish(results[c], got[c], True)
            else:
                retry.append(c)

    # Retries: each missing level alone, with a longer window.
    for c in retry:
        level = results[c]
        for k in range(2, max_attempts + 1):
            f = replace(flags, concurrency=(c, c, 1), measurement_ms=flags.measurement_ms * 2 ** (k - 1),
                        max_trials=flags.max_trials + 5 * (k - 1))
            level.attempts += 1
            attempt = run(f, f"c{c}_a{k}")
            row = next((r for r in attempt.rows if int(r["concurrency"]) == c), None)
            if row is not None:
                finish(level, row, True)
                break
        else:
            row = None
            if relaxed_stability_pct is not None and relaxed_stability_pct > flags.stability_pct:
                f = replace(flags, concurrency=(c, c, 1), stability_pct=relaxed_stability_pct,
                            measurement_ms=flags.measurement_ms * 2 ** (max_attempts - 1))
                level.attempts += 1
                attempt = run(f, f"c{c}_relaxed")
                row = next((r for r in attempt.rows if int(r["concurrency"]) == c), None)
            finish(level, row, False)
    return Measurement(flags.model, list(results.values()), attempts)
