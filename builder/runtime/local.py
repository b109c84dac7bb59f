"""The `local` runtime: a tritonserver process on this machine.

Discovery: an explicit path, then `tritonserver` on PATH, then the server bundled in the
`nvidia-pytriton` wheel. A pytriton-style server (one with `python_backend_stubs/` beside `bin/`)
gets a private backend directory in a temporary work dir (its python backend plus the stub for
the stub environment's Python), the stub environment's `bin/` first on PATH and its libpython
directory first on LD_LIBRARY_PATH. Nothing is written into site-packages.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from builder.errors import RunError, UserError
from builder.runtime.ports import resolve_ports, url
from builder.runtime.server import ServerHandle, read_tail, wait_ready

STOP_GRACE_S = 15.0  # the server's own --exit-timeout-secs=10, plus a margin
PORT_RETRIES = 3  # auto-picked ports can be taken between the check and the server's bind
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class Layout:
    """Where a tritonserver's parts are."""

    tritonserver: Path
    backends: Path | None = None  # a full install's backends/ (its own stub); None for pytriton style
    python_backend: Path | None = None  # pytriton style: backends/python (libtriton_python.so, utils)
    stubs: Path | None = None  # pytriton style: python_backend_stubs/<3.X>/triton_python_backend_stub
    libs: Path | None = None  # pytriton style: nvidia_pytriton.libs (RPATH breaks once copied)


def bundled_tritonserver() -> Path | None:
    """The server inside the installed nvidia-pytriton wheel, without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "tritonserver" / "bin" / "tritonserver"
        if candidate.is_file():
            return candidate
    return None


def find_tritonserver(explicit: Path | None = None) -> Path:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UserError(f"{path}: not an executable tritonserver; fix --tritonserver")
        return path.resolve()
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path).resolve()
    bundled = bundled_tritonserver()
    if bundled is None:
        raise UserError("no tritonserver found: not on PATH and nvidia-pytriton is not installed; "
                        "pip install nvidia-pytriton==0.7.0, give --tritonserver PATH, or use --runtime docker")
    return bundled.resolve()


def layout_of(tritonserver: Path) -> Layout:
    root = tritonserver.parent.parent
    if (root / "python_backend_stubs").is_dir():
        libs = root.parent.parent / "nvidia_pytriton.libs"
        return Layout(tritonserver, python_backend=root / "backends" / "python", stubs=root / "python_backend_stubs",
                      libs=libs if libs.is_dir() else None)
    if (root / "backends").is_dir():
        return Layout(tritonserver, backends=root / "backends")
    raise UserError(f"{tritonserver}: no backends/ or python_backend_stubs/ next to its bin/; "
                    f"point --tritonserver at a full Triton install or the nvidia-pytriton one")


_PROBE = """
import json, sys, sysconfig
try:
    from importlib.metadata import version
    numpy = version("numpy")
except Exception:
    numpy = None
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "prefix": sys.prefix, "numpy": numpy,
                  "libdir": sysconfig.get_config_var("LIBDIR"),
                  "soname": sysconfig.get_config_var("INSTSONAME")}))
"""


@dataclass(frozen=True)
class StubEnv:
    """The Python environment the python backend stub embeds."""

    python: Path  # its python3; its directory goes first on PATH
    version: str  # "3.11"
    prefix: str
    numpy: str
    libdir: str  # holds the libpython that matches its standard library


def stub_env(stub_python: Path | None = None) -> StubEnv:
    """Probe the stub's environment and refuse one the python backend cannot serve correctly."""
    python = Path(stub_python).expanduser() if stub_python else Path(sys.prefix) / "bin" / "python3"
    if python.name != "python3" or not python.is_file():
        raise UserError(f"{python}: the stub needs an environment's 'bin/python3' (it finds its Python as the "
                        f"first python3 on PATH); give --stub-python such a path")
    try:
        done = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True)
        info = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
        raise UserError(f"{python}: cannot probe this Python ({exc})") from exc
    if info["numpy"] is None:
        raise UserError(f"numpy is not installed in {info['prefix']}; the python backend needs it: "
                        f"pip install 'numpy<2' there")
    if int(info["numpy"].split(".")[0]) >= 2:
        raise UserError(f"numpy {info['numpy']} in {info['prefix']}: under numpy 2 the python backend returns empty "
                        f"outputs; install 'numpy<2' there or give --stub-python a Python with numpy<2")
    soname = info["soname"] or f"libpython{info['version']}.so.1.0"
    if not (info["libdir"] and (Path(info["libdir"]) / soname).exists()):
        raise UserError(f"{python}: no shared {soname} in {info['libdir']}; the python backend stub needs a "
                        f"Python built with --enable-shared")
    return StubEnv(python=python, version=info["version"], prefix=info["prefix"], numpy=info["numpy"],
                   libdir=info["libdir"])


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def private_backends(layout: Layout, env: StubEnv, workdir: Path) -> Path:
    """backends/python with the stub for `env`'s Python, under `workdir`; returns backends/."""
    stub = layout.stubs / env.version / "triton_python_backend_stub"
    if not stub.is_file():
        have = ", ".join(sorted(p.name for p in layout.stubs.iterdir())) or "none"
        raise UserError(f"{layout.tritonserver}: no python backend stub for Python {env.version} (have: {have}); "
                        f"give --stub-python a Python of one of those versions")
    target = workdir / "backends" / "python"
    target.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _link_or_copy(layout.python_backend / name, target / name)
    _link_or_copy(stub, target / "triton_python_backend_stub")
    return workdir / "backends"


def lasting_backends(target: Path, *, tritonserver: Path | None = None,
                     stub_python: Path | None = None) -> tuple[Path, Path, dict[str, str]]:
    """The backend directory `serve` assembles in a temporary work dir, built under `target` to last
    (for tools that start their own tritonserver, such as Model Analyzer). Returns the tritonserver
    binary, the backend directory (target/backends) and the variables the server needs on top of a
    plain environment: PATH (the stub environment's bin/ first) and LD_LIBRARY_PATH (its libpython,
    the server's bundled libraries, the CUDA runtime wheel's lib/ that perf_analyzer links)."""
    from builder.perf.analyzer import cuda_runtime_lib_dir

    layout = layout_of(find_tritonserver(tritonserver))
    target = Path(target)
    if layout.backends is not None:  # a full install: its own backends/ and stub
        return layout.tritonserver, layout.backends, {}
    env = stub_env(stub_python)
    if (target / "backends").exists():
        shutil.rmtree(target / "backends")
    backends = private_backends(layout, env, target)
    cuda = cuda_runtime_lib_dir()
    libraries = [env.libdir, str(layout.libs) if layout.libs else None, str(cuda) if cuda else None]
    variables = {"PATH": os.pathsep.join([str(env.python.parent), "/usr/local/bin", "/usr/bin", "/bin"]),
                 "LD_LIBRARY_PATH": os.pathsep.join(p for p in libraries if p)}
    return layout.tritonserver, backends, variables


def server_command(layout: Layout, repo: Path, backends: Path, host: str, ports: dict[str, int], gpus: bool,
                   shm_prefix: str) -> list[str]:
    command = [
        str(layout.tritonserver),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        f"--http-address={host}", f"--http-port={ports['http']}",
        f"--grpc-address={host}", f"--grpc-port={ports['grpc']}",
        f"--metrics-address={host}", f"--metrics-port={ports['metrics']}",
        f"--allow-gpu-metrics={'true' if gpus else 'false'}",
    ]
    if not gpus:
        command.append("--pinned-memory-pool-byte-size=0")
    command += [
        "--exit-timeout-secs=10",
        "--log-verbose=0",
        "--strict-readiness=true",
        "--exit-on-error=false",  # keep serving long enough to report every failed model's reason
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]
    return command


def served_path(repo: Path, workdir: Path) -> Path:
    """The path the server is given for `repo`. The python backend starts each stub with the model's
    path as one of several space-separated words, so a path with whitespace breaks every model
    ("Expected 9 arguments, found 3"); such a repository is served through a symlink in `workdir`."""
    if not any(ch.isspace() for ch in str(repo)):
        return repo
    alias = workdir / "repository"
    alias.symlink_to(repo, target_is_directory=True)
    return alias


def server_environment(layout: Layout, env: StubEnv | None, workdir: Path) -> dict[str, str]:
    environ = dict(os.environ)
    # side effects stay in the work dir: pytriton's home, onnxruntime's and others' caches
    environ["PYTRITON_HOME"] = str(workdir / "pytriton")
    environ["XDG_CACHE_HOME"] = str(workdir / "cache")
    if env is not None:
        environ["PATH"] = os.pathsep.join(p for p in (str(env.python.parent), environ.get("PATH")) if p)
        libraries = [env.libdir, str(layout.libs) if layout.libs else None, environ.get("LD_LIBRARY_PATH")]
        environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
    return environ


# --- processes -------------------------------------------------------------------------------

def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def stop_process(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the server, wait, then SIGKILL its whole process group (stubs included)."""
    pgid = proc.pid  # own session: the server leads its group
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 5.0
    while True:
        if proc.poll() is None or group_members(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(0.1)
        except subprocess.TimeoutExpired:
            pass
        if proc.poll() is not None and not group_members(pgid):
            return
        if time.monotonic() > deadline:
            raise RunError(f"tritonserver (process group {pgid}) did not die after SIGKILL: "
                           f"{group_members(pgid)} still running")
        time.sleep(0.05)


def remove_shm(prefix: str) -> None:
    """Shared memory regions a crashed stub leaves behind (Triton removes them on a clean stop)."""
    for path in SHM_DIR.glob(prefix + "*"):
        try:
            path.unlink()
        except OSError:
            pass


_libc = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the server goes when this process dies


def _preexec():
    """PR_SET_PDEATHSIG when starting from the main thread (it fires when the *thread* exits)."""
    global _libc
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _die_with_parent


def start_local(repo: Path, *, ports: dict[str, int | None], host: str, tritonserver: Path | None,
                log_path: Path | None, ready_timeout: float, gpus: bool,
                stub_python: Path | None) -> ServerHandle:
    chosen = resolve_ports(host, ports)  # a busy port is a UserError before anything starts
    layout = layout_of(find_tritonserver(tritonserver))
    env = stub_env(stub_python) if layout.backends is None else None
    auto = all(port is None for port in ports.values())
    for attempt in range(1, PORT_RETRIES + 1):
        try:
            return _launch(repo, layout, env, chosen, host, log_path, ready_timeout, gpus)
        except RunError as exc:
            if not (auto and attempt < PORT_RETRIES and "already in use" in str(exc)):
                raise
            chosen = resolve_ports(host, ports)
    raise AssertionError("unreachable")


def _launch(repo: Path, layout: Layout, env: StubEnv | None, ports: dict[str, int], host: str,
            log_path: Path | None, ready_timeout: float, gpus: bool) -> ServerHandle:
    workdir = Path(tempfile.mkdtemp(prefix="triton-builder-server-"))
    own_log = log_path is None
    if own_log:
        fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    log_path = Path(log_path).expanduser().resolve()
    shm_prefix = f"triton_builder_{secrets.token_hex(4)}_"
    proc = None

    def cleanup(clean: bool) -> None:
        try:
            if proc is not None:
                stop_process(proc)
        finally:
            remove_shm(shm_prefix)
            shutil.rmtree(workdir, ignore_errors=True)
            if own_log and (clean or proc is None):  # a failed start keeps its log: the error names it
                log_path.unlink(missing_ok=True)

    try:
        backends = layout.backends or private_backends(layout, env, workdir)
        command = server_command(layout, served_path(repo, workdir), backends, host, ports, gpus, shm_prefix)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=server_environment(layout, env, workdir), cwd=workdir,
                                    start_new_session=True, preexec_fn=_preexec())
        models = wait_ready(url(host, ports["http"]), exit_code=proc.poll, read_log=lambda: read_tail(log_path),
                            log_name=str(log_path), timeout=ready_timeout)
    except BaseException:  # KeyboardInterrupt too: nothing survives a failed start
        cleanup(clean=False)
        raise
    return ServerHandle(runtime="local", repo=repo, http_url=url(host, ports["http"]),
                        grpc_url=url(host, ports["grpc"]), metrics_url=url(host, ports["metrics"]),
                        log_path=log_path, command=tuple(command), pid=proc.pid, models=models,
                        _stopper=lambda: cleanup(clean=True))
