"""Measure every passed variant of a built repository with perf_analyzer; write a results directory.

    results_dir = run_perf(Path("model_repository"), concurrency=(1, 4, 16))
    write_report(results_dir)

`run_perf` checks the request (Settings), picks the variants, writes their input data and the run's
manifest, and hands the measuring to a `Run` (one variant after another on one server, with the
server's CPU/GPU use and ensembles' step times per level); text-generation models go to perf/llm.py.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape

from builder.diagnose.usage import UsageSampler
from builder.errors import RunError, UserError
from builder.manifest import read_manifest, signature_of
from builder.perf.analyzer import (
    PROTOCOLS,
    LevelResult,
    PerfAnalyzerError,
    PerfFlags,
    find_perf_analyzer,
    measure,
    perf_analyzer_version,
    perf_env,
)
from builder.perf.inputs import describe_inputs, ensemble_tokenizer, write_input_data
from builder.perf.results import (COLUMNS, REPEATS_CSV, level_row, machine_info, new_results_dir, not_run_rows,
                                  save_results, save_steps, server_record, step_rows, step_stats, to_frame,
                                  tool_versions, variant_record)

MEASURED_ROLES = ("variant", "ensemble")  # preprocess/postprocess steps only when named
RUN_SCHEMA = 1


def select_variants(manifest: dict, names: list[str] | None) -> dict[str, dict]:
    """The manifest entries to measure: every passed variant/ensemble, or exactly those named."""
    entries: dict[str, dict] = manifest.get("models", {})
    known = sorted(entries)
    if names is None:
        chosen = {n: e for n, e in entries.items()
                  if e.get("role", "variant") in MEASURED_ROLES and e.get("status") == "passed"}
        if not chosen:
            raise UserError("no passed model variant in this repository to measure "
                            f"(models: {', '.join(known) or 'none'})")
        return dict(sorted(chosen.items()))
    if not names:
        raise UserError("no models named; leave models unset to measure every passed variant")
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise UserError(f"unknown model(s) {', '.join(unknown)}; this repository has: {', '.join(known)}")
    # a rendered LLM-backend target (vLLM, TensorRT-LLM) is measured when named, on the server that runs it (--url)
    failed = [n for n in names if entries[n].get("status") not in ("passed", "rendered")]
    if failed:
        raise UserError(f"model(s) {', '.join(failed)} did not pass verification and are not served for measurement")
    return {n: entries[n] for n in dict.fromkeys(names)}


def _stats_reader(server):
    """A function returning step_stats() of the server's per-model statistics, or None when no client fits."""
    try:
        if getattr(server, "grpc_url", None):
            import tritonclient.grpc as client_module

            client = client_module.InferenceServerClient(server.grpc_url)
        elif getattr(server, "http_url", None):
            import tritonclient.http as client_module

            client = client_module.InferenceServerClient(server.http_url)
        else:
            return None
    except Exception:  # noqa: BLE001 - statistics are extra; the measurement goes on without them
        return None

    def read() -> dict | None:
        try:
            grpc = client_module.__name__.endswith("grpc")  # http answers JSON already
            return step_stats(client.get_inference_statistics(**({"as_json": True} if grpc else {})))
        except Exception:  # noqa: BLE001
            return None

    return read


def median_repeat(repeated: list):
    """One Measurement from several of the same levels: per level, the repeat with the median throughput."""
    if len(repeated) == 1:
        return repeated[0]
    levels = []
    for i, first in enumerate(repeated[0].levels):
        candidates = sorted((m.levels[i] for m in repeated if m.levels[i].values), key=lambda lv: lv.values["throughput"])
        levels.append(candidates[(len(candidates) - 1) // 2] if candidates else first)
    return type(repeated[0])(repeated[0].model, levels, [a for m in repeated for a in m.attempts])


def _answers(url: str, timeout: float = 2.0) -> bool:
    """Whether something still accepts connections at `url` (host:port, IPv6 in brackets)."""
    host, _, port = url.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Settings:
    """How every variant of a run is measured (the run manifest's `settings`); checked when made."""

    concurrency: tuple[int, ...]
    protocol: str = "grpc"
    measurement_ms: int = 2000
    stability_pct: float = 25.0
    max_trials: int = 10
    batch_size: int = 1
    max_attempts: int = 3
    relaxed_stability_pct: float | None = 100.0
    percentile: int | None = None
    repeats: int = 1
    input_entries: int = 4

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UserError(f"protocol {self.protocol!r} must be one of {', '.join(PROTOCOLS)}")
        if self.repeats < 1:
            raise UserError(f"repeats {self.repeats} must be >= 1")
        if not self.concurrency or self.concurrency[0] < 1:
            raise UserError(f"concurrency levels {list(self.concurrency)} must be integers >= 1")

    def flags(self, model: str, url: str, input_data: str | None = None) -> PerfFlags:
        return PerfFlags(model=model, url=url, protocol=self.protocol, measurement_ms=self.measurement_ms,
                         stability_pct=self.stability_pct, max_trials=self.max_trials, batch_size=self.batch_size,
                         percentile=self.percentile, input_data=input_data)

    def record(self) -> dict:
        return {**asdict(self), "concurrency": list(self.concurrency)}


def run_perf(repo: Path, *, server=None, models: list[str] | None = None, concurrency=(1, 4, 16),
             out: Path | None = None, protocol: str = "grpc", measurement_ms: int = 2000,
             stability_pct: float = 25.0, max_trials: int = 10, batch_size: int = 1, max_attempts: int = 3,
             percentile: int | None = None,
             relaxed_stability_pct: float | None = 100.0, input_entries: int = 4,
             perf_analyzer: Path | None = None, runtime: str = "local", console: Console | None = None,
             prompt_tokens: int = 32, output_tokens: int = 64, repeats: int = 1,
             input_files: dict[str, Path] | None = None, keep_going: bool = False,
             sampling: dict[str, float] | None = None) -> Path:
    """Measure the repository's variants at each concurrency level and return the results directory.

    `server`: a running server (anything with `grpc_url` / `http_url`); when None one is started on
    `repo` with builder.runtime.start_server(runtime=...) and stopped afterwards. The directory
    (default perf/results/<UTC timestamp>/) gets results.csv, manifest.json, inputs/ and raw/.
    If perf_analyzer or the server fails, what was measured is still written, the manifest says
    complete: false, and RunError is raised naming the directory.
    `input_files`: perf_analyzer --input-data files to use for these variants instead of generated ones
    (e.g. the repository's <model>/perf_input.json); copied into inputs/ like the generated ones.
    `keep_going`: when perf_analyzer fails on one variant (a level timed out, say) and the server still
    answers, record its levels as failed and measure the other variants; RunError is raised at the end.
    `repeats` > 1 measures every variant that many times: results.csv keeps, per level, the repeat
    with the median throughput, and repeats.csv every repeat (what `compare` takes its noise from).
    """
    repo = Path(repo)
    console = console or Console(highlight=False)
    settings = Settings(tuple(sorted({int(c) for c in concurrency})), protocol, measurement_ms, stability_pct,
                        max_trials, batch_size, max_attempts, relaxed_stability_pct, percentile, repeats, input_entries)
    build = read_manifest(repo)
    if server is None:  # about to start one: a broken repository is a clear error before any process starts
        from builder.validate import validate_repository

        validate_repository(repo)
    variants = select_variants(build, models)
    generators = {n: e for n, e in variants.items() if "generation" in e}
    if generators:  # text generation is measured as LLM servers are: TTFT, ITL, tokens/s (builder/perf/llm.py)
        if len(generators) != len(variants):
            raise UserError(f"text-generation models ({', '.join(generators)}) are measured apart from the others; "
                            "pick them, or the others, with --model")
        from builder.perf.llm import measure_generators

        return measure_generators(repo, generators, server=server, concurrency=list(settings.concurrency), out=out,
                                  prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                                  perf_analyzer=perf_analyzer, console=console, sampling=sampling)
    signatures = signatures_of(repo, variants, batch_size)
    binary = find_perf_analyzer(perf_analyzer)
    settings.flags("check", "127.0.0.1:1")  # the flags checked once before anything starts
    started = datetime.now(timezone.utc)
    results_dir = new_results_dir(out, started)
    inputs = input_data_files(repo, variants, signatures, results_dir, input_entries, input_files or {})
    manifest = {
        "schema": RUN_SCHEMA, "run": results_dir.name, "repo": str(repo.resolve()),
        "started": started.isoformat(timespec="seconds"), "finished": None, "complete": False,
        "settings": settings.record(),
        "perf_analyzer": {"path": str(binary), "version": perf_analyzer_version(binary)},
        "server": None, "versions": tool_versions(), "build_versions": build.get("tool_versions", {}),
        "machine": machine_info(),
        "variants": {name: {**variant_record(name, entry), "inputs": describe_inputs(inputs[name])}
                     for name, entry in variants.items()},
        "commands": [], "errors": [],
    }
    run = Run(settings, results_dir, manifest, inputs, binary, console)
    try:
        with contextlib.ExitStack() as stack:
            if server is None:
                from builder.runtime import start_server

                console.print(f"starting a {runtime} Triton server on {escape(str(repo))}")
                server = stack.enter_context(start_server(repo, runtime=runtime))
            run.measure_all(server, stack, keep_going)
    except BaseException as exc:  # the server failed to start, Ctrl-C, ...: keep what was measured, then re-raise
        manifest["errors"].append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        run.save()
    return run.outcome()


def signatures_of(repo: Path, variants: dict[str, dict], batch_size: int) -> dict:
    """Each variant's signature from its manifest entry; refused where it has none or the batch is too big."""
    signatures = {}
    for name, entry in variants.items():
        if "signature" not in entry:
            raise UserError(f"{repo}: model {name} has no signature in its manifest entry; rebuild the repository")
        sig = signature_of(entry)
        if batch_size > 1 and sig.max_batch_size < batch_size:
            raise UserError(f"model {name}: batch size {batch_size} exceeds its max_batch_size {sig.max_batch_size}")
        signatures[name] = sig
    return signatures


def input_data_files(repo: Path, variants: dict[str, dict], signatures: dict, results_dir: Path, entries: int,
                     given: dict[str, Path]) -> dict[str, Path]:
    """results_dir/inputs/<variant>.json for every variant: made from its signature (token inputs from its
    ensemble's tokenizer where it has one), or copied from `given`."""
    inputs = {name: write_input_data(sig, results_dir / "inputs" / f"{name}.json", entries=entries,
                                     tokenizer=ensemble_tokenizer(repo, variants[name]))
              for name, sig in signatures.items() if name not in given}
    for name, source in given.items():
        target = results_dir / "inputs" / f"{name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        inputs[name] = target
    return inputs


class Run:
    """One perf run in progress: measures the variants one after another on a server, keeps every row (and
    the server's CPU/GPU use and, for ensembles, each step's time per level), and writes what it has."""

    def __init__(self, settings: Settings, results_dir: Path, manifest: dict, inputs: dict[str, Path],
                 binary: Path, console: Console):
        self.settings, self.results_dir, self.manifest, self.inputs = settings, results_dir, manifest, inputs
        self.binary, self.console, self.env = binary, console, perf_env()
        self.rows: list[dict] = []
        self.repeat_rows: list[dict] = []  # repeats > 1: every repeat's rows, with its number
        self.steps_rows: list[dict] = []  # ensembles: time per composing model, from Triton's statistics
        self.usage: dict[tuple[str, int], dict] = {}  # (variant, concurrency) -> server CPU / GPU use then
        self.failure: PerfAnalyzerError | None = None
        self.lost = ""  # set when the server stopped answering during the run
        self.failed: list[str] = []  # variants perf_analyzer failed on
        self.pending = list(manifest["variants"])

    def row_args(self, name: str) -> dict:
        entry = self.manifest["variants"][name]
        return dict(run=self.results_dir.name, model=entry["model"], variant=name, format=entry["format"],
                    precision=entry["precision"], batch_size=self.settings.batch_size)

    def level_rows(self, name: str, levels) -> list[dict]:
        return [level_row(level, **self.row_args(name), usage=self.usage.get((name, level.concurrency)))
                for level in levels]

    def record_attempts(self, name: str, attempts) -> None:
        self.manifest["commands"].extend(
            {"variant": name, "command": a.command, "returncode": a.returncode, "seconds": round(a.seconds, 2)}
            for a in attempts)

    def show(self, name: str, level: LevelResult) -> None:
        v, used = level.values, self.usage.get((name, level.concurrency), {})
        numbers = f"{v['throughput']:.1f} infer/s, p99 {v['p99_us'] / 1000:.2f} ms" if v else "no numbers"
        numbers += "".join(f", {label} {used[key]:.0f} %" for key, label in
                           (("server_cpu_pct", "server CPU"), ("gpu_util_pct", "GPU")) if key in used)
        style = {"ok": "green", "unstable": "yellow"}.get(level.status, "red")
        tries = f", {level.attempts} attempts" if level.attempts > 1 else ""
        self.console.print(f"  {name} c={level.concurrency}: {numbers} [{style}]{level.status}[/{style}]{tries}",
                           soft_wrap=True)

    def measure_all(self, server, stack: contextlib.ExitStack, keep_going: bool) -> None:
        self.manifest["server"] = server_record(server)
        url = getattr(server, f"{self.settings.protocol}_url", None)
        if not url:
            raise UserError(f"the server given has no {self.settings.protocol} URL; pass protocol='grpc' or 'http' "
                            "to match it")
        sampler = stack.enter_context(UsageSampler(pid=getattr(server, "pid", None),
                                                   metrics_url=getattr(server, "metrics_url", None)))
        read_stats = _stats_reader(server) if any(v.get("steps") for v in self.manifest["variants"].values()) \
            else None
        while self.pending:
            name = self.pending[0]
            try:
                result = self.measure_variant(name, url, sampler, read_stats)
            except PerfAnalyzerError as exc:
                self.record_attempts(name, exc.attempts)
                self.rows.extend(self.level_rows(name, exc.levels))
                self.pending.pop(0)
                if self.failure is not None:  # an earlier variant's, measured past with keep_going
                    self.manifest["errors"].append(str(self.failure))
                self.failure = exc
                self.failed.append(name)
                if not _answers(url):
                    self.lost = f"the Triton server at {url} stopped answering while {name} was measured"
                    self.manifest["errors"].append(self.lost)
                    return
                if not keep_going:
                    return
                self.console.print(f"  {escape(name)} failed ({escape(str(exc))}); measuring the others", soft_wrap=True)
                continue
            self.record_attempts(name, result.attempts)
            self.rows.extend(self.level_rows(name, result.levels))
            self.pending.pop(0)

    def measure_variant(self, name: str, url: str, sampler, read_stats):
        """Every level of `name`, `repeats` times (the median repeat kept); raises PerfAnalyzerError."""
        settings, entry = self.settings, self.manifest["variants"][name]
        steps = entry.get("steps") if read_stats else None
        snapshot = {"stats": read_stats() if steps else None}
        sampler.take()  # start this variant's first level afresh

        def on_level(level: LevelResult) -> None:
            self.usage[(name, level.concurrency)] = sampler.take()
            self.show(name, level)
            if not steps:
                return
            after = read_stats()
            if snapshot["stats"] is not None and after is not None and level.values:
                self.steps_rows.extend(step_rows(snapshot["stats"], after, steps, run=self.results_dir.name,
                                                 variant=name, concurrency=level.concurrency))
            snapshot["stats"] = after

        self.console.print(f"[bold]{name}[/bold] ({entry['model']}, {entry['format']} {entry['precision']}): "
                           f"concurrency {', '.join(map(str, settings.concurrency))}", soft_wrap=True)
        flags = settings.flags(name, url, str(self.inputs[name].resolve()))
        repeated = []
        for r in range(settings.repeats):
            workdir = self.results_dir / "raw" / name / (f"r{r + 1}" if settings.repeats > 1 else "")
            repeated.append(measure(flags, settings.concurrency, workdir, max_attempts=settings.max_attempts,
                                    relaxed_stability_pct=settings.relaxed_stability_pct, binary=self.binary,
                                    env=self.env, on_level=on_level))
            if settings.repeats > 1:
                self.repeat_rows.extend({**row, "repeat": r + 1} for row in self.level_rows(name, repeated[-1].levels))
        return median_repeat(repeated)

    def save(self) -> None:
        """results.csv (+ repeats.csv, steps.csv) and manifest.json with whatever was measured."""
        for name in self.pending:
            self.rows.extend(not_run_rows(self.settings.concurrency, **self.row_args(name)))
        if self.failure is not None:
            self.manifest["errors"].append(str(self.failure))
        self.manifest["complete"] = self.failure is None and not self.pending and all(
            r["status"] in ("ok", "unstable") for r in self.rows)
        self.manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        save_results(self.results_dir, to_frame(self.rows), self.manifest)
        if self.repeat_rows:
            pd.DataFrame(self.repeat_rows, columns=[*COLUMNS, "repeat"]).to_csv(self.results_dir / REPEATS_CSV,
                                                                               index=False)
        save_steps(self.results_dir, self.steps_rows)

    def outcome(self) -> Path:
        """The results directory; RunError naming it where perf_analyzer failed."""
        if self.failure is not None:
            head = f"{self.lost}\n" if self.lost else ""
            if len(self.failed) > 1:
                head += f"{len(self.failed)} variants failed ({', '.join(self.failed)}); the last: "
            raise RunError(f"{head}{self.failure}\npartial results kept in {self.results_dir} (marked incomplete)") \
                from self.failure
        unstable = sum(r["status"] != "ok" for r in self.rows)
        self.console.print(f"results in {escape(str(self.results_dir))}"
                           + (f" ({unstable} level(s) not stable: see status)" if unstable else ""))
        return self.results_dir
