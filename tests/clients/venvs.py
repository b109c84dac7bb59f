"""The real LLM clients' venvs: .tools/clients/NAME holds exactly tests/clients/NAME.lock (pip --require-hashes,
--no-deps), and records the lock's sha256 once installed; a venv whose recorded hash differs from its lock's, or
that has none (an install cut short), is made anew. Run by `make client-venvs` and by tests/test_openai_clients.py.

usage: python tests/clients/venvs.py NAME...   (with the Python 3.11 the locks were made for)"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOLS = HERE.parents[1] / ".tools" / "clients"
STAMP = "lock.sha256"


def ensure(name: str) -> Path:
    """The python of NAME's venv, (re)made from its lock when the lock changed."""
    lock = HERE / f"{name}.lock"
    if not lock.is_file():
        known = sorted(p.stem for p in HERE.glob("*.lock"))
        raise SystemExit(f"error: no lock for client {name!r} in {HERE} (known: {', '.join(known)})")
    want = hashlib.sha256(lock.read_bytes()).hexdigest()
    home = TOOLS / name
    stamp = home / STAMP
    if stamp.is_file() and stamp.read_text().strip() == want:
        return home / "bin" / "python"
    # a venv from another lock holds packages the new lock may not name: start empty rather than pip-sync
    shutil.rmtree(home, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
    subprocess.run([str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", "--require-hashes", "-r", str(lock)], check=True)
    stamp.write_text(want + "\n")
    return home / "bin" / "python"


if __name__ == "__main__":
    if sys.version_info[:2] != (3, 11):
        raise SystemExit(f"error: the client locks are for Python 3.11, this is {sys.version.split()[0]}")
    for client in sys.argv[1:]:
        ensure(client)
