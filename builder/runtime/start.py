"""Start a Triton server on a model repository, wait until every model is ready, stop it cleanly.

    with start_server(repo) as server:          # raises RunError naming the models that failed
        client = InferenceServerClient(server.http_url)

The front door: it checks the arguments and picks a runtime (builder.runtime.local or
builder.runtime.docker); what those share is builder.runtime.server.
"""

from __future__ import annotations

from pathlib import Path

from builder.errors import UserError
from builder.runtime.docker import start_docker
from builder.runtime.local import start_local
from builder.runtime.server import DEFAULT_IMAGE, RUNTIMES, ServerHandle, _live


def start_server(repo: Path, runtime: str = "local", *, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, host: str = "127.0.0.1",
                 tritonserver: Path | None = None, log_path: Path | None = None, ready_timeout: float = 180.0,
                 gpus: bool = False, image: str = DEFAULT_IMAGE, stub_python: Path | None = None) -> ServerHandle:
    """Start Triton on `repo` and return once the server and every model in it are READY.

    Ports left None are picked free on `host`; a given port that is in use is a UserError raised
    before anything starts. `tritonserver` (local) and `stub_python` (local: the python3 whose
    environment the python backend stub runs in; default this interpreter's) override discovery.
    Raises RunError, with the failing models and log lines, when the server or a model fails.
    """
    repo = Path(repo).expanduser().resolve()
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    if not repo.is_dir():
        raise UserError(f"{repo}: no such model repository (not a directory)")
    if ready_timeout <= 0:
        raise UserError(f"ready timeout must be positive, got {ready_timeout}")
    ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
    if runtime == "local":
        if image != DEFAULT_IMAGE:
            raise UserError("--image only applies to the docker runtime")
        handle = start_local(repo, ports=ports, host=host, tritonserver=tritonserver, log_path=log_path,
                             ready_timeout=ready_timeout, gpus=gpus, stub_python=stub_python)
    else:
        if tritonserver is not None or stub_python is not None:
            raise UserError("--tritonserver and --stub-python only apply to the local runtime")
        handle = start_docker(repo, ports=ports, host=host, log_path=log_path, ready_timeout=ready_timeout,
                              gpus=gpus, image=image)
    _live.add(handle)
    return handle
