"""One root exception, split into "your input is wrong" and "something failed while running".

The CLI maps `UserError` to exit code 2 and `RunError` to exit code 1, printing one line and no
traceback for either.
"""


class BuilderError(Exception):
    """Root of every error triton-builder raises on purpose."""

    exit_code = 1


class UserError(BuilderError):
    """The input is wrong (spec, arguments, repository): the message says where and how to fix it."""

    exit_code = 2


class RunError(BuilderError):
    """Something failed while running (export, verification, server, perf_analyzer)."""

    exit_code = 1


def root_reason(exc: BaseException) -> str:
    """'Type: first line' of the innermost cause: what a user needs from a library's exception chain."""
    while exc.__cause__ is not None and exc.__cause__ is not exc:
        exc = exc.__cause__
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
