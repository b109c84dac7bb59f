"""Writing a repository safely: one build at a time (a lock), staged beside the output, moved into
place per model only when that model is complete; an interrupted build leaves the old one intact."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from builder.errors import UserError

LOCK = ".triton-builder.lock"


@contextlib.contextmanager
def locked(out: Path):
    """Hold the repository's lock file; a second holder gets a UserError naming the first one's pid.
    A directory made here and still empty at the end is removed: a build that wrote nothing leaves nothing."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{out}: another build is writing this repository (pid {holder}); "
                            "wait for it or use -o elsewhere") from None
        try:  # the holder before us may have removed the file between our open and our flock
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: whoever locks this inode next sees it is gone
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()


@contextlib.contextmanager
def staging(out: Path):
    """A temporary directory beside `out` (same filesystem, so moves are renames); always removed."""
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(out: Path, keep: Path) -> None:
    """Remove what a killed build left (staging directories beside `out`, old model directories and a
    half-written manifest inside it). Call with the lock held: no other build owns these."""
    leftovers = [p for p in out.parent.glob(f".{out.name}.staging-*") if p != keep]
    leftovers += list(out.glob(".*.old-*")) + list(out.glob("*.json.tmp"))
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM asked the build to stop (raised in the main thread, so every `finally` runs)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # signals seen by stop_on_signals' handler, until the context ends


def _stop(signum, frame):
    _received.append(signum)
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Turn Ctrl-C and SIGTERM into `Stopped` for the block. A handler's exception can be lost (raised
    inside a `__del__`, or swallowed by a library's bare `except`): `checkpoint()` raises it again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _stop) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _received.clear()


def checkpoint() -> None:
    """Raise `Stopped` if a signal arrived whose exception did not get through."""
    if _received:
        raise Stopped(_received[0])


@contextlib.contextmanager
def deferred_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them: what it moves lands whole.

    Python-level, not a signal mask: a process-directed signal may reach any thread (torch's pools
    among them), while Python handlers always run in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(received[0])  # the restored handler runs now


def install(staged: Path, out: Path) -> None:
    """Replace out/<name> with the staged model directory (rename old aside, rename new in, drop old)."""
    target = out / staged.name
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staged.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_records(model_dir: Path) -> list[dict]:
    records = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        records.append({"path": str(path.relative_to(model_dir)), "bytes": path.stat().st_size,
                        "sha256": digest.hexdigest()})
    return records
