"""What every runtime shares: the server handle, readiness with failing-model reports, log excerpts,
a clean stop. builder.runtime.local and builder.runtime.docker build on it; builder.runtime.start
(`start_server`, the front door) picks one of them. This module imports neither: no cycle.

The server never outlives the `with` block (exceptions and KeyboardInterrupt included); a handle
that is never entered is stopped by `stop()` or, at the latest, when the interpreter exits.
"""

from __future__ import annotations

import atexit
import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from builder.deploy import ngc
from builder.errors import RunError

RUNTIMES = ("local", "docker")
# the docker runtime's image: the newest checked NGC release (builder.deploy.ngc has the table)
DEFAULT_IMAGE = ngc.DEFAULT_IMAGE
LOG_LINES = 20
POLL_S = 0.2


@dataclass(eq=False)
class ServerHandle:
    """A running server. URLs are tritonclient style (`host:port`, no scheme)."""

    runtime: str
    repo: Path
    http_url: str
    grpc_url: str
    metrics_url: str
    log_path: Path | None  # deleted on a clean stop when start_server chose it; kept on failure
    command: tuple[str, ...]  # the server's command line (inside the container for docker)
    pid: int | None = None  # local runtime
    container_id: str | None = None  # docker runtime
    image: str | None = None  # docker runtime: the image tag it runs
    models: tuple[str, ...] = ()  # names of the models READY once started
    _stopper: Callable[[], None] | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop the server and release what it held; safe to call twice."""
        stopper, self._stopper = self._stopper, None
        _live.discard(self)
        if stopper is not None:
            stopper()

    @property
    def running(self) -> bool:
        return self._stopper is not None

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_live: set[ServerHandle] = set()


@atexit.register
def _stop_all() -> None:
    for handle in list(_live):
        try:
            handle.stop()
        except Exception:  # noqa: BLE001 - interpreter exit: stop the others regardless
            pass


# --- readiness -------------------------------------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def http_request(url: str, path: str, method: str = "GET", timeout: float = 2.0) -> tuple[int, bytes] | None:
    """(status, body) of one request to a server at `url` (host:port); None when nothing answers."""
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(f"http://{url}{path}", data=data, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, socket.timeout, http.client.HTTPException):
        return None


def repository_index(url: str) -> list[dict] | None:
    """The server's repository index (name, version, state, reason); None while it does not answer."""
    answer = http_request(url, "/v2/repository/index", method="POST")
    if answer is None or answer[0] != 200:
        return None
    return json.loads(answer[1])


def wait_ready(http_url: str, *, exit_code: Callable[[], int | None], read_log: Callable[[], str],
               log_name: str, timeout: float) -> tuple[str, ...]:
    """Poll until the server and all its models are READY; return the model names.

    Fails fast when the process exits or a model is UNAVAILABLE, with the reasons and log lines.
    """
    deadline = time.monotonic() + timeout
    index: list[dict] | None = None
    while True:
        code = exit_code()
        if code is not None:
            log = read_log()
            raise RunError(f"tritonserver exited with code {code} before it was ready{hint(log)}\n"
                           + log_excerpt(log, (), log_name))
        index = repository_index(http_url)
        if index is not None:
            failed = {m["name"]: m.get("reason", "") for m in index if m.get("state") == "UNAVAILABLE"}
            if failed:
                # the reason, without the python stub's traceback ("At: ..."): the log lines below keep it
                lines = "\n".join(f"- {name}: {_one_line(reason.split(chr(10) + 'At:')[0]) or 'unavailable'}"
                                  for name, reason in failed.items())
                raise RunError(f"{len(failed)} model(s) failed to load: {', '.join(failed)}\n{lines}\n"
                               + log_excerpt(read_log(), tuple(failed), log_name))
            states = {m.get("state") for m in index}
            if states <= {"READY"}:
                answer = http_request(http_url, "/v2/health/ready")
                if answer is not None and answer[0] == 200:
                    return tuple(dict.fromkeys(m["name"] for m in index))
        if time.monotonic() > deadline:
            states = ", ".join(f"{m['name']}={m.get('state')}" for m in index or ()) or "no answer on HTTP"
            log = read_log()
            raise RunError(f"tritonserver was not ready after {timeout:.0f} s ({states}){hint(log)}\n"
                           + log_excerpt(log, (), log_name))
        time.sleep(POLL_S)


# --- log helpers -----------------------------------------------------------------------------

_HINTS = (
    ("already in use", "a port was taken by another process; pick other ports"),
    ("_recursion_count", "the python backend stub loaded a libpython that does not match its environment's "
                         "standard library: LD_LIBRARY_PATH must start with that Python's sysconfig LIBDIR"),
    ("libpython", "the python backend stub cannot load libpython: LD_LIBRARY_PATH must contain that Python's "
                  "sysconfig LIBDIR"),
    ("is not healthy", "the python backend stub crashed; with numpy 2 in its environment it does"),
)


def hint(log: str) -> str:
    for needle, text in _HINTS:
        if needle in log:
            return f" ({text})"
    return ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


_TABLE = re.compile(r"^\s*[+|]")
# harmless on a machine without a GPU; never the reason something failed
_NOISE = ("Failed to initialize NVML", "DCGM", "CudaDriverHelper has not been initialized", "Unable to get GPU")


def log_excerpt(log: str, names: tuple[str, ...], log_name: str, limit: int = LOG_LINES) -> str:
    """The last `limit` log lines that matter: lines naming a model in `names` or errors, else the tail."""
    lines = [line.rstrip() for line in log.splitlines() if line.strip() and not _TABLE.match(line)
             and not any(noise in line for noise in _NOISE)]
    picked = lines
    if names:
        pattern = re.compile("|".join(rf"\b{re.escape(n)}\b" for n in names))
        relevant = [line for line in lines if pattern.search(line) or line.startswith("E")]
        picked = relevant or lines
    tail = picked[-limit:]
    body = "\n".join(f"  {line}" for line in tail) if tail else "  (empty)"
    return f"log {log_name}, last {len(tail)} relevant line(s):\n{body}"


def read_tail(path: Path, max_bytes: int = 256 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
