"""The `triton-builder` command. Thin: each command parses arguments and calls one library function.
Heavy imports happen inside the commands, so `--help` is fast."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from builder.errors import BuilderError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn PyTorch / Hugging Face models into a verified, measured Triton model repository.")
err = Console(stderr=True)


def _fail(exc: BuilderError) -> None:
    from rich.markup import escape

    err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _levels(text: str, example: str) -> list[int]:
    """--concurrency: integers separated by commas; a UserError naming the option otherwise."""
    from builder.errors import UserError

    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--concurrency {text!r}: give integers separated by commas, e.g. {example}") from None


@contextlib.contextmanager
def _interruptible(what: str):
    """Ctrl-C and SIGTERM end the command through its clean-up code, then exit 130 / 143 with one line."""
    from builder.repository import Stopped, stop_on_signals

    try:
        with stop_on_signals():
            yield
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Stopped) and exc.signum == signal.SIGTERM
        err.print(f"[red]error:[/] {'SIGTERM' if term else 'Ctrl-C'}: {what}", highlight=False, soft_wrap=True)
        raise typer.Exit(143 if term else 130) from None


@app.command()
def build(
    spec: Path = typer.Argument(..., help="YAML spec (see examples/)."),
    out: Path = typer.Option(Path("model_repository"), "-o", "--out", help="Repository directory to write."),
    runtime: Optional[str] = typer.Option(None, help="python (any Triton with the python backend) or native "
                                                       "(onnxruntime/tensorrt backends); default: the spec's."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Build only these models (repeatable)."),
    keep_failed: bool = typer.Option(False, help="Write variants that fail verification, marked failed."),
    keep_going: bool = typer.Option(False, help="Build the other models when one fails; exit 1 at the end."),
    cache: bool = typer.Option(True, help="Reuse variants built before from the same inputs "
                                          "($TRITON_BUILDER_CACHE, default ~/.cache/triton-builder)."),
) -> None:
    """Export every variant, verify it against the fp32 source, render configs, write the repository."""
    from builder.build import build as run_build

    from builder.errors import UserError

    if runtime not in (None, "python", "native"):
        _fail(UserError(f"--runtime {runtime!r}: use python or native"))
    try:
        with _interruptible(f"build stopped; {out} has only complete models, no staging left"):
            result = run_build(spec, out, runtime=runtime, only=model, keep_failed=keep_failed,
                               keep_going=keep_going, cache=cache)
    except BuilderError as exc:
        _fail(exc)
    if result.failed:
        from rich.markup import escape

        for failure in result.failed:
            err.print(f"[red]error:[/] {escape(failure.describe())}", highlight=False, soft_wrap=True)
        err.print(f"[red]{len(result.failed)} variant(s) did not pass[/]; see the table above")
        raise typer.Exit(1)


@app.command()
def validate(repo: Path = typer.Argument(Path("model_repository"), help="Repository to check.")) -> None:
    """Check a repository: configs parse, artifacts exist and match their configs, ensembles connect."""
    from builder.validate import validate_repository

    try:
        checked = validate_repository(repo)
    except BuilderError as exc:
        _fail(exc)
    err.print(f"[green]ok[/]: {checked} models in {repo} are valid")


def _pick_runtime(runtime: str, repo: Path) -> str:
    """auto: Docker (the NGC image) when an engine answers and the repository uses native backends,
    else the local tritonserver (on PATH or bundled with nvidia-pytriton)."""
    if runtime != "auto":
        return runtime
    from builder.runtime import docker_available

    manifest = repo / "triton-builder.json"
    native = manifest.is_file() and '"runtime": "native"' in manifest.read_text()
    return "docker" if native and docker_available() else "local"


@app.command()
def serve(
    repo: Path = typer.Argument(Path("model_repository"), help="Repository to serve."),
    runtime: str = typer.Option("auto", help="local | docker | auto"),
    http_port: int = typer.Option(8000, help="HTTP port (0: any free port)."),
    grpc_port: int = typer.Option(8001, help="gRPC port (0: any free port)."),
    metrics_port: int = typer.Option(8002, help="Metrics port (0: any free port)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    tritonserver: Optional[Path] = typer.Option(None, help="tritonserver binary (local runtime)."),
    stub_python: Optional[Path] = typer.Option(None, help="Python whose environment the python backend's stub uses "
                                                          "(local runtime; needs numpy<2); default: this one."),
    image: str = typer.Option(None, help="NGC image for --runtime docker."),
    gpus: bool = typer.Option(False, help="Request GPUs (docker runtime)."),
    check: bool = typer.Option(True, help="Send one request to every model after start-up and compare with the build."),
    once: bool = typer.Option(False, help="Stop right after the self-check (for scripts and CI)."),
    log: Optional[Path] = typer.Option(None, help="Keep the server's log in this file (text-generation models "
                                                  "write where their steps' time went to it when they unload)."),
    openai_port: Optional[int] = typer.Option(None, help="Also serve an OpenAI-compatible API (/v1/models, "
                                                         "/v1/completions, /v1/chat/completions, /v1/embeddings, /health, "
                                                         "/metrics) for text-generation models on this port."),
) -> None:
    """Start Triton on a repository, wait until every model is READY, self-check, serve until Ctrl-C."""
    import signal
    import threading

    from builder.errors import UserError
    from builder.runtime import DEFAULT_IMAGE, self_check, start_server
    from builder.validate import validate_repository

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if log is not None:  # a log that cannot be written is a one-line error before anything starts
            try:
                log.parent.mkdir(parents=True, exist_ok=True)
                log.touch()
            except OSError as exc:
                raise UserError(f"--log {log}: {exc.strerror}; give a file path that can be written") from None
        validate_repository(repo)
        chosen = _pick_runtime(runtime, repo)
        if (repo / "triton-builder.json").is_file():
            from builder.convert.onnx2trt import check_repository
            from builder.manifest import read_manifest

            check_repository(repo, read_manifest(repo), (image or DEFAULT_IMAGE) if chosen == "docker" else None)
        with start_server(repo, chosen, http_port=http_port or None, grpc_port=grpc_port or None,
                          metrics_port=metrics_port or None, host=host,
                          tritonserver=tritonserver, image=image or DEFAULT_IMAGE, gpus=gpus,
                          stub_python=stub_python, log_path=log) as server:
            err.print(f"[green]ready[/]: {len(server.models)} models ({chosen} runtime)")
            err.print(f"  HTTP    http://{server.http_url}\n  gRPC    {server.grpc_url}\n  metrics http://{server.metrics_url}/metrics")
            if check:
                results = self_check(server, repo)
                err.print(f"[green]self-check passed[/]: {sum(r.ok for r in results)} models answered as built")
                for r in results:
                    if r.cpu_missing:
                        err.print(f"  [yellow]{r.model}[/]: {r.cpu_note}")
            front = None
            if openai_port is not None:
                from builder.openai import start_front

                try:
                    front = start_front(repo, server.grpc_url, openai_port, host, server.metrics_url)
                except OSError as exc:
                    raise UserError(f"--openai-port {openai_port}: {exc.strerror}; choose a free port") from None
                err.print(f"  OpenAI  http://{host}:{front.server_port}/v1")
            if not once:
                err.print("serving; Ctrl-C stops")
                stop.wait()
            if front is not None:
                front.shutdown()
            err.print("stopping")
    except BuilderError as exc:
        _fail(exc)


@app.command()
def perf(
    repo: Path = typer.Argument(Path("model_repository"), help="Built repository."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Only these Triton models (repeatable)."),
    concurrency: str = typer.Option("1,4,16", help="Comma-separated concurrency levels."),
    out: Optional[Path] = typer.Option(None, help="Results directory (default perf/results/<UTC time>/)."),
    url: Optional[str] = typer.Option(None, help="host:port of a running server's gRPC endpoint; default: start one."),
    protocol: str = typer.Option("grpc", help="grpc | http"),
    measurement_ms: int = typer.Option(2000, help="perf_analyzer measurement window (-p)."),
    batch_size: int = typer.Option(1, help="Batch size of each request (-b)."),
    perf_analyzer: Optional[Path] = typer.Option(None, help="perf_analyzer binary (default: PATH, then the tritonclient wheel's)."),
    prompt_tokens: int = typer.Option(32, help="Text generation: tokens of the synthetic prompt."),
    output_tokens: int = typer.Option(64, help="Text generation: tokens generated per request (forced)."),
    temperature: float = typer.Option(0.0, help="Text generation: sample at this temperature (0: greedy), as chat "
                                                "clients do."),
    top_p: float = typer.Option(1.0, help="Text generation: nucleus sampling bound with --temperature."),
    stability_pct: float = typer.Option(25.0, help="perf_analyzer stability threshold in % (-s); also the noise "
                                                   "band 'compare' allows each run."),
    repeats: int = typer.Option(1, help="Measure each variant N times; results.csv keeps the median, repeats.csv all "
                                        "(the noise band of 'compare')."),
    keep_going: bool = typer.Option(False, help="Measure the other variants when perf_analyzer fails on one "
                                                "(its levels are marked failed); exit 1 at the end."),
) -> None:
    """Measure every variant with perf_analyzer at each concurrency; write a tidy results table.
    Text-generation models get TTFT, inter-token latency and tokens/s (perf_analyzer --streaming)."""
    from builder.errors import UserError
    from builder.perf import run_perf

    try:
        levels = _levels(concurrency, "1,4,16")
    except UserError as exc:
        _fail(exc)
    if temperature < 0 or not 0 < top_p <= 1:
        _fail(UserError(f"--temperature {temperature} / --top-p {top_p}: temperature must be >= 0 and top-p in (0, 1]"))
    sampling = {"temperature": temperature, **({"top_p": top_p} if top_p < 1 else {})} if temperature > 0 else None
    server = None
    if url:
        from types import SimpleNamespace

        server = SimpleNamespace(grpc_url=url, http_url=url)
    try:
        with _interruptible("perf stopped; what was measured is kept, marked incomplete"):
            results = run_perf(repo, server=server, models=model, concurrency=levels, out=out, protocol=protocol,
                               measurement_ms=measurement_ms, batch_size=batch_size, perf_analyzer=perf_analyzer,
                               prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                               repeats=repeats, stability_pct=stability_pct, keep_going=keep_going,
                               sampling=sampling)
    except BuilderError as exc:
        _fail(exc)
    err.print(f"results: {results}")
    typer.echo(str(results))


@app.command()
def report(
    results: Path = typer.Argument(..., help="A results directory written by 'triton-builder perf'."),
    latency_budget_ms: Optional[float] = typer.Option(None, help="p99 latency budget in ms."),
    accuracy_budget: Optional[float] = typer.Option(None, help="Minimum cosine similarity to the fp32 source."),
    baseline: Optional[str] = typer.Option(None, help="Baseline variant (default: the onnx fp32 of each model)."),
) -> None:
    """Write report.md and plots: throughput vs latency, breakdown, speedup, accuracy, the best variant."""
    from builder.perf import write_report

    try:
        path = write_report(results, latency_budget_ms=latency_budget_ms, accuracy_budget=accuracy_budget, baseline=baseline)
    except BuilderError as exc:
        _fail(exc)
    err.print(f"report: {path}")
    typer.echo(str(path))


@app.command()
def ask(
    repo: Path = typer.Argument(Path("model_repository"), help="Repository with a text-generation model."),
    prompt: str = typer.Argument(..., help="What to ask; sent through the model's chat template when it has one."),
    model: Optional[str] = typer.Option(None, help="Triton model name (default: the repository's first generation model)."),
    max_tokens: int = typer.Option(128, help="New tokens at most."),
    url: Optional[str] = typer.Option(None, help="host:port of a running server's gRPC endpoint; default: start one."),
) -> None:
    """Stream one answer from a text-generation model to the terminal (gRPC streaming)."""
    from builder.errors import UserError
    from builder.generation.client import grpc_stream
    from builder.manifest import read_manifest

    try:
        entries = {n: e for n, e in read_manifest(repo)["models"].items() if "generation" in e and e.get("status") == "passed"}
        if not entries:
            raise UserError(f"{repo}: no text-generation model here; build one with task: text-generation")
        name = model or next(iter(entries))
        if name not in entries:
            raise UserError(f"--model {name}: not a text-generation model of {repo}; have: {', '.join(entries)}")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(repo / name / "1"))
        special = not tokenizer.chat_template
        text = prompt if special else tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        with contextlib.ExitStack() as stack:
            if url is None:
                from builder.runtime import start_server

                err.print(f"starting Triton on {repo} ...")
                url = stack.enter_context(start_server(repo)).grpc_url
            with _interruptible("ask stopped"):
                answer = grpc_stream(url, name, text, on_piece=show, max_tokens=max_tokens, add_special_tokens=special)
        sys.stdout.write("\n")
        err.print(f"[{answer['num_output_tokens']} tokens, finish_reason {answer['finish_reason']}]")
    except BuilderError as exc:
        _fail(exc)


@app.command()
def deploy(
    repo: Path = typer.Argument(Path("model_repository"), help="Built repository (with triton-builder.json)."),
    out: Path = typer.Option(Path("deploy"), "-o", "--out", help="Directory to write (must not exist, or --force)."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
    base_image: Optional[str] = typer.Option(None, help="NGC Triton image (default: the one serve uses)."),
    image: Optional[str] = typer.Option(None, help="Name of the image to build (default triton-builder/<repo>:latest)."),
    name: str = typer.Option("triton", help="Compose service / Kubernetes name."),
    metrics_target: Optional[str] = typer.Option(None, help="host:port Prometheus scrapes (default <name>:8002)."),
    scrape_interval: str = typer.Option("15s", help="Prometheus scrape and evaluation interval."),
    rate_window: str = typer.Option("1m", help="rate() window of the recording rules (>= 4 scrape intervals)."),
    latency_budget_ms: float = typer.Option(100.0, help="Alert when the average queue time per request is above it."),
    failure_ratio: float = typer.Option(0.01, help="Alert when failed / all requests is above it."),
    queue_target_ms: float = typer.Option(10.0, help="HPA target: average queue time per request."),
    min_replicas: int = typer.Option(1, help="HPA minimum replicas."),
    max_replicas: int = typer.Option(4, help="HPA maximum replicas."),
    storage_uri: str = typer.Option("pvc://triton-models/model_repository", help="KServe, Dynamo: where the repository is."),
    target: Optional[list[str]] = typer.Option(None, "--target", help="compose, kubernetes, kserve, dynamo, kserve-llm (repeatable; default: all that apply)."),
    disaggregated: bool = typer.Option(False, help="dynamo, kserve-llm: separate prefill and decode workers."),
    ttft_budget_ms: float = typer.Option(2000.0, help="LLM alert: p95 time to first token above it."),
    llm_metrics_target: Optional[str] = typer.Option(None, help="host:port Prometheus scrapes for LLM metrics (default <name>:9000)."),
) -> None:
    """Write a Dockerfile, compose.yaml (Triton, Prometheus, Grafana), Prometheus rules, Kubernetes, KServe and, for an LLM, Dynamo and KServe LLM files."""
    from builder.deploy import DeployOptions
    from builder.deploy import deploy as run_deploy

    try:
        options = DeployOptions(base_image=base_image, image=image, name=name, metrics_target=metrics_target,
                                scrape_interval=scrape_interval, rate_window=rate_window,
                                latency_budget_ms=latency_budget_ms, failure_ratio=failure_ratio,
                                queue_target_ms=queue_target_ms, min_replicas=min_replicas, max_replicas=max_replicas,
                                storage_uri=storage_uri, targets=tuple(target or ()), disaggregated=disaggregated,
                                ttft_budget_ms=ttft_budget_ms, llm_metrics_target=llm_metrics_target)
        files = run_deploy(repo, out, options, force=force)
    except BuilderError as exc:
        _fail(exc)
    err.print(f"[green]wrote[/] {len(files)} files to {out}; see {out / 'README.md'}")
    typer.echo(str(out))


@app.command()
def profile(
    repo: Path = typer.Argument(Path("model_repository"), help="Built repository."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Only these variants (Triton model names, repeatable)."),
    out: Optional[Path] = typer.Option(None, help="Where profile.md, profile.json and traces go (default: perf/results/profile-<UTC time>/)."),
    results: Optional[Path] = typer.Option(None, help="A perf results directory of REPO: the advice reads its served breakdown."),
    batch: Optional[list[int]] = typer.Option(None, "--batch", help="Batch sizes to profile (default 1 and min(8, max_batch_size))."),
    accuracy_budget: Optional[float] = typer.Option(None, help="Minimum cosine for the accuracy advice."),
    try_: bool = typer.Option(False, "--try", help="Apply the top suggestion to a copy of the spec, rebuild, re-measure, show before/after."),
    concurrency: str = typer.Option("1,4", help="--try: concurrency levels of the before/after measurement."),
    tritonserver: Optional[Path] = typer.Option(None, help="--try: tritonserver binary (default: PATH, then nvidia-pytriton's)."),
    stub_python: Optional[Path] = typer.Option(None, help="--try: python3 whose environment the python backend stub uses."),
    gpus: bool = typer.Option(False, help="--try: start the servers with GPUs."),
) -> None:
    """Where each variant's time goes (operators, roofline, memory) and what to change, with the evidence."""
    from rich.markup import escape

    from builder.diagnose.profile import profile_repository

    try:
        levels = _levels(concurrency, "1,4")
        with _interruptible("profile stopped"):
            path, _, tips = profile_repository(repo, models=model, out=out, batches=batch, results=results,
                                               accuracy_budget=accuracy_budget, console=err)
            err.print(f"profile: {path}")
            for tip in tips:
                change = f" -> {tip.change.describe()}" if tip.change else ""
                err.print(escape(f"  advice ({tip.rule}, {tip.variant}): {tip.message}{change}"), highlight=False,
                          soft_wrap=True)
            if try_:
                from builder.diagnose.trial import try_advice
                from builder.manifest import read_manifest

                options = {"tritonserver": tritonserver, "stub_python": stub_python, "gpus": gpus}
                tip, cmp_path, _ = try_advice(repo, read_manifest(repo), tips, path.parent, concurrency=levels,
                                              server_options=options, console=err)
                typer.echo(cmp_path.read_text())
                err.print(f"before/after: {cmp_path}")
    except BuilderError as exc:
        _fail(exc)
    if not try_:
        typer.echo(path.read_text())


@app.command()
def tune(
    repo: Path = typer.Argument(Path("model_repository"), help="Built repository."),
    model: Optional[str] = typer.Option(None, "--model", help="The variant to tune (default: the best in --results, "
                                                              "or the repository's only variant)."),
    results: Optional[Path] = typer.Option(None, help="A perf results directory of REPO: tune its best variant."),
    budget: int = typer.Option(10, help="Runs at most (one server start and one perf run each), the default included."),
    latency_budget_ms: float = typer.Option(50.0, help="p99 budget in ms; the best is the highest throughput within it."),
    concurrency: str = typer.Option("4,16", help="Comma-separated concurrency levels of every run."),
    measurement_ms: int = typer.Option(1000, help="perf_analyzer measurement window (-p) of every run."),
    apply: bool = typer.Option(False, "--apply", help="Write the chosen configuration into REPO (config.pbtxt and "
                                                      "triton-builder.json), validated; nothing changes on failure."),
    out: Optional[Path] = typer.Option(None, help="Where tune.json, tune.md and tune-runs/ go (default: perf/results/tune-<UTC "
                                                  "time>/; a perf results directory makes its report show the result)."),
    tritonserver: Optional[Path] = typer.Option(None, help="tritonserver binary (default: PATH, then nvidia-pytriton's)."),
    stub_python: Optional[Path] = typer.Option(None, help="python3 whose environment the python backend stub uses."),
) -> None:
    """Search one variant's serving configuration (instances, max batch size, preferred batch sizes, queue
    delay) with the real server and perf_analyzer; report the best under the latency budget next to the default."""
    from builder.errors import UserError
    from builder.perf.tune import apply_tuned
    from builder.perf.tune import tune as run_tune

    try:
        levels = _levels(concurrency, "4,16")
        with _interruptible("tune stopped; the repository is unchanged"):
            where, summary = run_tune(repo, model=model, results=results, budget=budget,
                                      latency_budget_ms=latency_budget_ms, concurrency=levels,
                                      measurement_ms=measurement_ms, out=out, console=err,
                                      server_options={"tritonserver": tritonserver, "stub_python": stub_python})
            typer.echo((where / "tune.md").read_text())
            if apply:
                chosen = summary["chosen"]
                if chosen is not None and chosen["settings"] == summary["default"]["settings"]:
                    err.print("--apply: the default stays; nothing to write")
                else:
                    path = apply_tuned(repo, summary)
                    err.print(f"[green]applied[/]: {path} ({chosen['label']})")
    except BuilderError as exc:
        _fail(exc)
    err.print(f"tune: {where / 'tune.md'}")


@app.command("analyzer-files")
def analyzer_files(
    repo: Path = typer.Argument(Path("model_repository"), help="Built repository."),
    out: Path = typer.Option(Path("model_analyzer"), "-o", "--out", help="Directory to write."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Models to profile (default: every passed variant)."),
    concurrency: Optional[str] = typer.Option(None, help="Comma-separated concurrency levels (default: Model Analyzer's "
                                                         "search, up to 16)."),
    latency_budget_ms: float = typer.Option(50.0, help="Model Analyzer's latency_budget (p99, ms)."),
    force: bool = typer.Option(False, help="Write into OUT even if it is not empty."),
    tritonserver: Optional[Path] = typer.Option(None, help="tritonserver binary (default: PATH, then nvidia-pytriton's)."),
    stub_python: Optional[Path] = typer.Option(None, help="python3 whose environment the python backend stub uses."),
) -> None:
    """Write what NVIDIA's Model Analyzer needs to profile REPO with this machine's Triton: a lasting backend
    directory, config.yaml (server, environment, input data), run.sh and a README with the commands."""
    from builder.errors import UserError
    from builder.perf.modelanalyzer import write_analyzer_files

    try:
        levels = _levels(concurrency, "4,16") if concurrency else None
        files = write_analyzer_files(repo, out, models=model, tritonserver=tritonserver, stub_python=stub_python,
                                     concurrency=levels, latency_budget_ms=latency_budget_ms, force=force)
    except BuilderError as exc:
        _fail(exc)
    err.print(f"[green]wrote[/] {', '.join(p.name for p in files)} to {out}; see {out / 'README.md'}")
    typer.echo(str(out / "config.yaml"))


@app.command()
def compare(
    base: Path = typer.Argument(..., help="The baseline results directory (from 'triton-builder perf')."),
    new: Path = typer.Argument(..., help="The results directory to check against it."),
    threshold: float = typer.Option(10.0, help="Smallest change in percent that counts (beyond the noise band too)."),
    out: Optional[Path] = typer.Option(None, help="Where compare.md / .csv / .png go (default: NEW)."),
) -> None:
    """Regression gate: change in throughput, p50 and p99 per variant and level, with noise bands; exit 1 on a regression."""
    from builder.perf.compare import write_comparison

    try:
        result, path = write_comparison(base, new, threshold_pct=threshold, out=out)
    except BuilderError as exc:
        _fail(exc)
    typer.echo(path.read_text())
    err.print(f"comparison: {path}")
    if not result.regressions.empty:
        err.print(f"[red]{len(result.regressions)} regression(s)[/] beyond the noise and the {threshold:g} % threshold")
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - a bug or a library's surprise: one line and a log, no traceback
        from rich.markup import escape

        from builder.errors import unexpected

        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "triton-builder")
        err.print(f"[red]error:[/] {escape(command)}: {escape(str(unexpected(exc, command)))}", highlight=False,
                  soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":  # python -m builder.cli (where the console script is not installed, e.g. the GPU machine)
    main()
