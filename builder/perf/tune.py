"""`triton-builder tune`: search the serving configuration of one variant.

The settings that matter for a served variant (instance count, max_batch_size, preferred batch sizes,
the batcher's queue delay) are swept within a budget of runs. Each candidate is the variant's own
config.pbtxt with those fields changed (edited as a ModelConfig message, written as text, parsed back
with Triton's schema), served from a private copy of its model directory by the real server and
measured by `perf` (builder.perf.run) exactly as `triton-builder perf` measures. The score of a
candidate is the report's operating point: the highest stable throughput whose p99 is within the
latency budget.

Search: the default first; then, coarse, a star around it (per axis the grid value two steps away on
each side, one on an axis of fewer than 5 values; max_batch_size also 1, no batching); then every axis move
that beat the default, combined; then the one-step neighbours of the best so far (max_batch_size first, and 1
among them: it interacts with the instance count), until the budget is spent or nothing new is left. The last two runs of the budget
measure the leader and the default once more (2 shared cores measure one configuration 20 % apart
from one run to the next); a configuration scores the mean of its runs, and the default stays unless
the best gains MIN_GAIN_PCT and more than the spread of the default's own runs. OUT gets tune.json, tune.md and tune-runs/NN/ (one perf results
directory per run).
`apply_tuned` writes the chosen config into the repository and its manifest, or nothing. The configuration
space and the search order are builder/perf/search.py; this module runs and scores the candidates.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from builder import markdown as md
from builder.errors import RunError, UserError
from builder.perf.inputs import PERF_INPUT
from builder.perf.search import Settings, config_text, grids, search, settings_of, with_settings
from builder.render import parse_config

TUNE_JSON = "tune.json"
TUNE_MD = "tune.md"
MIN_GAIN_PCT = 10.0  # a smaller gain over the default is not worth changing the config for (compare's threshold)
CONFIRM_RUNS = 2  # the leader and the default, measured once more each at the end
# --------------------------------------------------------------------------- the real thing

def pick_variant(repo: Path, manifest: dict, model: str | None, results: Path | None,
                 latency_budget_ms: float | None) -> str:
    """The variant to tune: the one named, else the report's best in `results`, else the only one."""
    entries = manifest["models"]
    tunable = {n for n, e in entries.items() if why_not(repo, n, e) is None}
    if model is not None:
        if model not in entries:
            raise UserError(f"--model {model}: not in {repo}; tunable models: {', '.join(sorted(tunable)) or 'none'}")
        why = why_not(repo, model, entries[model])
        if why:
            raise UserError(f"--model {model}: {why}")
        return model
    if results is not None:
        from builder.perf.select import best_of, evaluate
        from builder.perf.results import load_results

        table, run = load_results(results)
        table = table[table["variant"].isin(tunable)]
        choices = evaluate(table, run.get("variants", {}), latency_budget_ms, None) if not table.empty else []
        best = best_of(choices)
        if best is None:
            raise UserError(f"--results {results}: no tunable variant of {repo} fits the budget there; name one with --model")
        return best.variant
    if len(tunable) == 1:
        return next(iter(tunable))
    raise UserError(f"{repo}: {len(tunable)} tunable variants; name one with --model "
                    f"({', '.join(sorted(tunable)) or 'none'}) or give --results of a perf run to tune its best")


def why_not(repo: Path, name: str, entry: dict) -> str | None:
    if entry.get("status") != "passed":
        return "did not pass verification"
    if entry.get("role", "variant") != "variant":
        return (f"is {'an' if entry.get('role') == 'ensemble' else 'a'} {entry.get('role')}, not a variant; "
                "tune the variant it serves")
    if "generation" in entry or entry.get("target"):
        return "a text-generation / LLM-backend model: its serving is configured by its own backend, not tuned here"
    if not (Path(repo) / name / "config.pbtxt").is_file():
        return "has no config.pbtxt (a rendered-only model cannot be served here)"
    return None


def _min_batch(repo: Path, manifest: dict, name: str) -> int:
    """The largest max_batch_size among the ensembles that call `name` (Triton refuses a smaller one)."""
    floor = 1
    for other, entry in manifest["models"].items():
        if entry.get("role") == "ensemble" and name in entry.get("steps", []):
            path = Path(repo) / other / "config.pbtxt"
            if path.is_file():
                floor = max(floor, parse_config(path.read_text(), f"{other}/config.pbtxt").max_batch_size)
    return floor


def _private_copy(repo: Path, name: str, entry: dict, text: str, target: Path) -> Path:
    """target/ as a repository holding only `name` (files hard-linked, config.pbtxt written anew) and a
    manifest with its entry."""
    from builder.manifest import MANIFEST, SCHEMA

    source = Path(repo) / name

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target / name, copy_function=link,
                    ignore=lambda d, names: ["config.pbtxt"] if Path(d) == source else [])
    (target / name / "config.pbtxt").write_text(text)  # a new file: the original is never written through
    (target / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "spec": None,
                                               "models": {name: entry}}))
    return target


@dataclass
class Candidate:
    index: int
    settings: Settings
    throughput: float | None = None
    p99_ms: float | None = None
    concurrency: int | None = None
    fits: bool = False
    note: str = ""
    results: str | None = None

    def row(self) -> dict:
        return {**asdict(self), "settings": asdict(self.settings), "label": self.settings.label()}


def tune(repo: Path, *, model: str | None = None, results: Path | None = None, budget: int = 10,
         latency_budget_ms: float = 50.0, concurrency=(4, 16), measurement_ms: int = 1000,
         out: Path | None = None, server_options: dict | None = None, console=None) -> tuple[Path, dict]:
    """Search `model`'s serving configuration; write OUT/tune.json and tune.md; return (out, summary)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from builder.manifest import read_manifest
    from builder.perf.analyzer import find_perf_analyzer
    from builder.perf.select import operating_point
    from builder.perf.results import load_results, machine_info
    from builder.perf.run import run_perf
    from builder.runtime import start_server
    from builder.validate import validate_repository

    repo = Path(repo)
    console = console or Console(stderr=True, highlight=False)
    if budget < 2:
        raise UserError(f"--budget {budget}: the search needs at least 2 runs (the default and one candidate)")
    if latency_budget_ms <= 0:
        raise UserError(f"--latency-budget-ms {latency_budget_ms:g}: give a positive p99 budget in ms")
    levels = sorted({int(c) for c in concurrency})
    if not levels or levels[0] < 1:
        raise UserError(f"--concurrency {list(concurrency)}: give integers >= 1, e.g. 4,16")
    manifest = read_manifest(repo)
    validate_repository(repo)
    name = pick_variant(repo, manifest, model, results, latency_budget_ms)
    entry = manifest["models"][name]
    find_perf_analyzer()  # a missing binary is a clear error before any server starts
    cfg = parse_config((repo / name / "config.pbtxt").read_text(), f"{name}/config.pbtxt")
    default = settings_of(cfg).normal()
    grid = grids(default, cores=os.cpu_count() or 1, min_batch=_min_batch(repo, manifest, name))
    started = datetime.now(timezone.utc)
    if out is None:
        out = Path("perf/results") / f"tune-{started.strftime('%Y%m%dT%H%M%SZ')}"
    out = Path(out)
    if (out / TUNE_JSON).exists():
        raise UserError(f"{out}: already holds {TUNE_JSON}; choose another --out directory")
    out.mkdir(parents=True, exist_ok=True)
    candidates: list[Candidate] = []
    quiet = Console(file=io.StringIO())
    inputs = (repo / name / PERF_INPUT).resolve()  # what `perf` sends this variant (ensemble sentences included)
    console.print(escape(f"tuning {name}: up to {budget} runs at concurrency {','.join(map(str, levels))}, "
                         f"p99 budget {latency_budget_ms:g} ms; default: {default.label()}"))

    def evaluate(s: Settings) -> float | None:
        c = Candidate(len(candidates), s)
        candidates.append(c)
        progress.update(task, description=escape(f"#{c.index} {s.label()}"))
        where = out / "tune-runs" / f"{c.index:02d}"
        work = Path(tempfile.mkdtemp(prefix=".tune-", dir=out))
        try:
            text = config_text(with_settings(cfg, s), f"{name}/config.pbtxt (candidate {c.index})")
            copy = _private_copy(repo, name, entry, text, work / "repo")
            (where.parent).mkdir(parents=True, exist_ok=True)
            with start_server(copy, **(server_options or {})) as server:
                run_perf(copy, server=server, models=[name], concurrency=levels, out=where,
                         measurement_ms=measurement_ms, max_attempts=2, console=quiet,
                         input_files={name: inputs} if inputs.is_file() else None)
        except RunError as exc:
            c.note = str(exc).strip().splitlines()[0]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if (where / "results.csv").is_file():
            c.results = str(where)
            row, why = operating_point(load_results(where)[0], latency_budget_ms)
            if row is not None:
                c.throughput, c.p99_ms, c.concurrency = float(row["throughput"]), float(row["p99_ms"]), int(row["concurrency"])
                c.fits = True
            c.note = c.note or why
        shown = f"{c.throughput:.1f} infer/s, p99 {c.p99_ms:.2f} ms (c={c.concurrency})" if c.fits else c.note
        progress.console.print(escape(f"  #{c.index} {s.label()}: {shown}"), soft_wrap=True)
        progress.advance(task)
        return c.throughput

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("tuning", total=budget)
        confirm = CONFIRM_RUNS if budget >= 2 + CONFIRM_RUNS else 0
        search(default, grid, budget - confirm, evaluate)
        leader = summarize(name, candidates, latency_budget_ms)["best"]
        if confirm and leader and leader["settings"] != asdict(default):  # the leader and the default once more each
            for s in (default, Settings(**{**leader["settings"], "preferred": tuple(leader["settings"]["preferred"])})):
                evaluate(s)
    summary = summarize(name, candidates, latency_budget_ms)
    summary.update(repo=str(repo.resolve()), started=started.isoformat(timespec="seconds"),
                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), budget=budget,
                   concurrency=levels, measurement_ms=measurement_ms, machine=machine_info(),
                   grid={k: [list(v) if isinstance(v, tuple) else v for v in vals] for k, vals in grid.items()})
    (out / TUNE_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / TUNE_MD).write_text(markdown(summary))
    return out, summary


def summarize(name: str, candidates: list[Candidate], latency_budget_ms: float) -> dict:
    """The search's outcome: every run, and per configuration the mean of its runs within the budget;
    the default, the best and the chosen one (the default unless the best gains MIN_GAIN_PCT and more than
    the default's runs differ from each other)."""
    groups: dict[Settings, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.settings, []).append(c)

    def outcome(s: Settings) -> dict:
        runs = groups[s]
        fit = [c for c in runs if c.fits]
        mean = sum(c.throughput for c in fit) / len(fit) if fit else None
        return {"settings": asdict(s), "label": s.label(), "runs": [c.index for c in runs], "fits": bool(fit),
                "throughput": mean, "p99_ms": max((c.p99_ms for c in fit), default=None),
                "concurrency": max((c.concurrency for c in fit), default=None)}

    outcomes = [outcome(s) for s in groups]
    default = outcomes[0]
    fitting = [o for o in outcomes if o["fits"]]
    best = max(fitting, key=lambda o: o["throughput"]) if fitting else None
    gain = 100.0 * (best["throughput"] / default["throughput"] - 1) if best and default["fits"] else None
    # the default's own run-to-run spread is the noise a gain has to clear, as well as MIN_GAIN_PCT
    again = [c.throughput for c in groups[next(iter(groups))] if c.fits]
    noise = 100.0 * (max(again) / min(again) - 1) if len(again) > 1 else 0.0
    needed = max(MIN_GAIN_PCT, noise)
    chosen = default if default["fits"] and (gain is None or gain < needed) else best
    return {"variant": name, "latency_budget_ms": latency_budget_ms, "min_gain_pct": needed, "noise_pct": noise,
            "default": default, "best": best, "chosen": chosen, "gain_pct": gain,
            "configurations": outcomes, "candidates": [c.row() for c in candidates]}


def markdown(summary: dict) -> str:
    best, default, chosen, gain = summary["best"], summary["default"], summary["chosen"], summary["gain_pct"]

    def runs(o: dict) -> str:
        return f"run{'s' if len(o['runs']) > 1 else ''} {', '.join(f'#{i}' for i in o['runs'])}"

    lines = [f"# Serving-configuration search: {summary['variant']}", "",
             f"{len(summary['candidates'])} runs (budget {summary['budget']}), concurrency "
             f"{', '.join(map(str, summary['concurrency']))}, {summary['measurement_ms']} ms windows, "
             f"p99 budget {summary['latency_budget_ms']:g} ms; machine: {summary['machine'].get('cpu', '?')} "
             f"({summary['machine'].get('cpu_count', '?')} cores). Each run is one server start and one perf run "
             "(`tune-runs/NN/`) scored by the highest stable throughput whose p99 is within the budget; the leader "
             "and the default are measured once more at the end and a configuration's score is the mean of its runs.", ""]
    if best is None:
        lines += ["**No configuration fits the budget.**", ""]
    elif chosen is default:
        lines += [f"**Keep the default** ({default['label']}: {default['throughput']:.1f} infer/s, {runs(default)}): "
                  f"the best other, {best['label']} ({best['throughput']:.1f} infer/s, {runs(best)}), gains "
                  f"{gain:+.1f} %, below the {summary['min_gain_pct']:.0f} % worth a change (at least "
                  f"{MIN_GAIN_PCT:g} %, and more than the default's own spread between its runs, "
                  f"{summary['noise_pct']:.0f} %).", ""]
    else:
        versus = (f"{gain:+.1f} % over the default's {default['throughput']:.1f} infer/s (p99 {default['p99_ms']:.2f} ms, "
                  f"{runs(default)})" if gain is not None else "the default does not fit the budget")
        lines += [f"**Best under the budget:** {best['label']}: {best['throughput']:.1f} infer/s at p99 "
                  f"{best['p99_ms']:.2f} ms (concurrency {best['concurrency']}, {runs(best)}), {versus}.", ""]
    rows = [[f"{c['index']}{' (default)' if c['settings'] == default['settings'] else ''}", c["label"],
             md.num(c["throughput"], "{:.1f}"), md.num(c["p99_ms"]), md.num(c["concurrency"], "{}"),
             "yes" if c["fits"] else "no", c["note"]] for c in summary["candidates"]]
    lines += md.table(["#", "settings", "infer/s", "p99 (ms)", "at conc.", "within budget", "note"], rows)
    lines += ["", "On a shared machine two runs of one configuration can differ by 20 % or more; "
              "`triton-builder perf --repeats 3` on the applied configuration checks the gain."]
    return "\n".join(lines) + "\n"


def apply_tuned(repo: Path, summary: dict) -> Path:
    """Write the chosen configuration into REPO/<variant>/config.pbtxt and the manifest, validate the
    repository, and restore both files when anything fails. Returns the config's path."""
    from builder.manifest import MANIFEST, read_manifest, write_manifest
    from builder.repository import deferred_signals
    from builder.validate import validate_repository

    chosen = summary.get("chosen")
    if chosen is None:
        raise UserError("--apply: no candidate fits the latency budget; nothing to apply")
    name = summary["variant"]
    repo = Path(repo)
    cfg_path, manifest_path = repo / name / "config.pbtxt", repo / MANIFEST
    s = Settings(**{**chosen["settings"], "preferred": tuple(chosen["settings"]["preferred"])})
    old_cfg, old_manifest = cfg_path.read_bytes(), manifest_path.read_bytes()
    cfg = parse_config(old_cfg.decode(), f"{name}/config.pbtxt")
    text = config_text(with_settings(cfg, s), f"{name}/config.pbtxt (tuned)")
    with deferred_signals():
        try:
            tmp = cfg_path.with_name(".config.pbtxt.tmp")
            tmp.write_text(text)
            tmp.replace(cfg_path)
            manifest = read_manifest(repo)
            entry = manifest["models"][name]
            if s.queue_delay_us is not None and "signature" in entry:
                entry["signature"]["max_batch_size"] = s.max_batch_size
            from builder.repository import file_records

            records = {r["path"]: r for r in file_records(repo / name) if r["path"] == "config.pbtxt"}
            entry["files"] = [records.get(f["path"], f) for f in entry.get("files", [])]
            entry["tuned"] = {"settings": chosen["settings"], "label": chosen["label"], "gain_pct": summary["gain_pct"],
                              "throughput": chosen["throughput"], "p99_ms": chosen["p99_ms"],
                              "concurrency": chosen["concurrency"], "at": summary.get("finished")}
            write_manifest(repo, manifest)
            validate_repository(repo)
        except BaseException:
            cfg_path.write_bytes(old_cfg)
            manifest_path.write_bytes(old_manifest)
            with contextlib.suppress(OSError):
                cfg_path.with_name(".config.pbtxt.tmp").unlink()
            raise
    return cfg_path


def tuned_line(results_dir: Path, variants: list[str]) -> str | None:
    """For report.md: what the serving-configuration search in results_dir found for one of `variants`."""
    path = Path(results_dir) / TUNE_JSON
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return f"({TUNE_JSON} here is not valid JSON; rerun `triton-builder tune`.)"
    chosen, default = summary.get("chosen"), summary.get("default")
    if summary.get("variant") not in variants or not chosen or not default:
        return None
    if chosen["settings"] == default["settings"]:
        return (f"Serving configuration (`{TUNE_JSON}`): {summary['variant']} keeps its default ({default['label']}); "
                f"no other of {len(summary['configurations'])} configurations gained {summary['min_gain_pct']:.0f} % or more.")
    gain = f", {summary['gain_pct']:+.1f} % over its default in the same search" if summary.get("gain_pct") is not None else ""
    return (f"**With its best serving configuration** (`{TUNE_JSON}`): {summary['variant']} with {chosen['label']} serves "
            f"{chosen['throughput']:.1f} infer/s at p99 {chosen['p99_ms']:.2f} ms (concurrency {chosen['concurrency']}){gain}; "
            "`triton-builder tune --apply` writes it into the repository.")

