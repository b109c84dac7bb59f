"""The format record and its registry (see builder.formats for what each field means)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _none(*_args, **_kwargs):
    return None


@dataclass(frozen=True)
class Format:
    name: str
    artifact: str  # the artifact's file name under the version directory
    export: Callable  # (job) -> (path, reproduce command)
    runner: Callable | None = None  # (path, sig, precision, device) -> feeds -> {output: array}; None: not here
    python_runner: str | None = None
    native: dict | None = None
    parameters: Callable = lambda job, path: {}
    check: Callable = lambda path, cfg, name: []
    preflight: Callable = _none
    render: Callable = _none
    record: Callable = lambda job, path: {}
    in_process: bool = True

    def backend(self, runtime: str) -> dict:
        """Which Triton backend serves this format under `runtime`, and the settings it needs."""
        if self.native is not None and (runtime == "native" or self.python_runner is None):
            return dict(self.native)
        return dict(platform="", backend="python", default_model_filename="")


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    FORMATS[fmt.name] = fmt
    return fmt
