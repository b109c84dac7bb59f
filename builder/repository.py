"""Writing a repository safely: one build at a time (a lock), staged beside the output, moved into
place per model only when that model is complete; an interrupted build leaves the old one intact."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from builder.errors import UserError

LOCK = ".triton-builder.lock"


@contextlib.contextmanager
def locked(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{out}: another build is writing this repository (pid {holder}); wait for it or use -o elsewhere") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def staging(out: Path):
    """A temporary directory beside `out` (same filesystem, so moves are renames); always removed."""
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
