"""One root exception, split into "your input is wrong" and "something failed while running".

The CLI maps `UserError` to exit code 2 and `RunError` to exit code 1, printing one line and no
traceback for either. An exception that is neither (a library's, or a bug) becomes a RunError through
`unexpected`, which keeps the full traceback in a log file and names it.
"""

import contextlib
import os
import re
import time
import traceback

from builder.paths import log_dir


class BuilderError(Exception):
    """Root of every error triton-builder raises on purpose."""

    exit_code = 1


class UserError(BuilderError):
    """The input is wrong (spec, arguments, repository): the message says where and how to fix it."""

    exit_code = 2


class RunError(BuilderError):
    """Something failed while running (export, verification, server, perf_analyzer)."""

    exit_code = 1


def unexpected(exc: BaseException, where: str) -> RunError:
    """An exception nobody raised on purpose (a library's, or a bug of ours), as a RunError of one line:
    where it happened, its innermost cause, and the log file that holds the full traceback."""
    text = "".join(traceback.format_exception(exc))
    try:
        folder = log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", where)[:80].strip("_") or "error"
        path = folder / f"{stamp}-{safe}-{os.getpid()}.log"
        path.write_text(f"{where}\n\n{text}", encoding="utf-8")
        log = f"full traceback: {path}"
    except OSError as err:  # a log we cannot write must not hide the error itself
        log = f"no traceback log ({err.strerror})"
    return RunError(f"{root_reason(exc)} (unexpected; {log})")


@contextlib.contextmanager
def step(name: str, where: str = ""):
    """Run a step of the work: our own errors pass through; any other exception becomes a RunError
    named after the step (`load: TypeError: ... (unexpected; full traceback: ...)`)."""
    try:
        yield
    except BuilderError:
        raise
    except Exception as exc:  # noqa: BLE001 - the point: nothing unexpected reaches the user as a traceback
        raise RunError(f"{name}: {unexpected(exc, f'{where} {name}'.strip())}") from exc


def root_reason(exc: BaseException) -> str:
    """'Type: first line' of the innermost cause: what a user needs from a library's exception chain."""
    while exc.__cause__ is not None and exc.__cause__ is not exc:
        exc = exc.__cause__
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
