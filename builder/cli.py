"""The `triton-builder` command. Thin: each command parses arguments and calls one library function.
Heavy imports happen inside the commands, so `--help` is fast."""

from __future__ import annotations

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
    err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@app.command()
def build(
    spec: Path = typer.Argument(..., help="YAML spec (see examples/)."),
    out: Path = typer.Option(Path("model_repository"), "-o", "--out", help="Repository directory to write."),
    runtime: Optional[str] = typer.Option(None, help="python (any Triton with the python backend) or native "
                                                       "(onnxruntime/tensorrt backends); default: the spec's."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Build only these models (repeatable)."),
    keep_failed: bool = typer.Option(False, help="Write variants that fail verification, marked failed."),
    keep_going: bool = typer.Option(False, help="Build the other models when one fails; exit 1 at the end."),
) -> None:
    """Export every variant, verify it against the fp32 source, render configs, write the repository."""
    from builder.build import build as run_build

    if runtime not in (None, "python", "native"):
        _fail(__import__("builder.errors").errors.UserError(f"--runtime {runtime!r}: use python or native"))
    try:
        result = run_build(spec, out, runtime=runtime, only=model, keep_failed=keep_failed, keep_going=keep_going)
    except BuilderError as exc:
        _fail(exc)
    if result.failed:
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
