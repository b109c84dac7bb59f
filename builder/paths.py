"""Where triton-builder keeps its own files: a leaf module (no builder imports), so errors, cache and
anything else can ask without importing each other."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

CACHE_ENV = "TRITON_BUILDER_CACHE"
LOGS_ENV = "TRITON_BUILDER_LOGS"
PROJECT = Path(__file__).resolve().parent.parent  # the checkout: builder/ and templates/
PYTHON_MODELS = PROJECT / "templates" / "python"  # the python-backend model files, copied into repositories


def cache_root() -> Path:
    """$TRITON_BUILDER_CACHE, else $XDG_CACHE_HOME/triton-builder, else ~/.cache/triton-builder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "triton-builder"


def log_dir() -> Path:
    """Where full tracebacks of unexpected errors go: $TRITON_BUILDER_LOGS, else <build cache>/logs."""
    if os.environ.get(LOGS_ENV):
        return Path(os.environ[LOGS_ENV]).expanduser()
    return cache_root() / "logs"


def python_template(name: str):
    """templates/python/<name>.py imported as an ordinary module: the builder runs the same code the served
    model files run (they stand alone in a repository, so that code lives there, not in this package)."""
    path = PYTHON_MODELS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"triton_builder_template_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
