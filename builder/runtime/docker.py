"""The `docker` runtime: Triton in an NGC container, through the Docker SDK.

`container_spec` is the whole container, as the exact keyword arguments of
`client.containers.run`: a pure function, tested as data. The repository is mounted read-only at
/models; ports are published on the given host address only.

(`import docker` below is the Docker SDK: imports are absolute, this module does not shadow it.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from builder.errors import RunError, UserError
from builder.runtime.ports import resolve_ports, url
from builder.runtime.server import ServerHandle, wait_ready

CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
SHM_SIZE = "1g"  # python backend tensors travel through /dev/shm; Docker's default 64 MB is too small
STOP_TIMEOUT_S = 15  # the server's --exit-timeout-secs=10, plus a margin
LABEL = "triton-builder"


def container_command(gpus: bool) -> list[str]:
    command = ["tritonserver", "--model-repository=/models", f"--allow-gpu-metrics={'true' if gpus else 'false'}"]
    if not gpus:
        command.append("--pinned-memory-pool-byte-size=0")
    return command + ["--exit-timeout-secs=10", "--log-verbose=0", "--strict-readiness=true", "--exit-on-error=false"]


def container_spec(repo: Path, *, image: str, ports: dict[str, int], host: str = "127.0.0.1",
                   gpus: bool = False) -> dict:
    """Keyword arguments for `docker.from_env().containers.run(**spec)`."""
    from docker.types import DeviceRequest, Ulimit

    spec = {
        "image": image,
        "command": container_command(gpus),
        "detach": True,
        "auto_remove": False,  # removed by stop(), after its logs are saved
        "volumes": {str(repo): {"bind": "/models", "mode": "ro"}},
        "ports": {f"{CONTAINER_PORTS[name]}/tcp": (host, ports[name]) for name in CONTAINER_PORTS},
        "shm_size": SHM_SIZE,
        # what NVIDIA's Triton quick start gives the container
        "ulimits": [Ulimit(name="memlock", soft=-1, hard=-1), Ulimit(name="stack", soft=67108864, hard=67108864)],
        "labels": {LABEL: "1", f"{LABEL}.repository": str(repo)},
    }
    if gpus:
        spec["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return spec


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def docker_client(timeout: float = 5.0):
    """A client whose engine answered a ping; UserError (one line) when none does."""
    import docker

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        raise UserError(f"docker runtime: no Docker engine answers ({_one_line(exc)}); "
                        f"start Docker or use --runtime local") from None
    return client


def run_to_completion(spec: dict, *, what: str, timeout: int) -> str:
    """Run a container (docker's `containers.run` keyword arguments) to its end and remove it; its logs, or
    RunError naming `what` with the log's tail when it exits non-zero."""
    import docker

    container = docker.from_env().containers.run(**spec)
    try:
        status = container.wait(timeout=timeout)
        logs = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
    if status.get("StatusCode") != 0:
        raise RunError(f"{what} failed (exit {status.get('StatusCode')}): {logs[-2000:]}")
    return logs


def docker_available(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers here (the CLI defaults to `local` when none does)."""
    try:
        docker_client(timeout)
    except (UserError, ImportError):
        return False
    return True


def start_docker(repo: Path, *, ports: dict[str, int | None], host: str, log_path: Path | None,
                 ready_timeout: float, gpus: bool, image: str) -> ServerHandle:
    import docker

    client = docker_client()
    chosen = resolve_ports(host, ports)
    spec = container_spec(repo, image=image, ports=chosen, host=host, gpus=gpus)
    own_log = log_path is None
    if own_log:
        log_path = Path(tempfile.mkstemp(prefix="tritonserver-docker-", suffix=".log")[1])
    log_path = Path(log_path).expanduser().resolve()
    try:
        container = client.containers.run(**spec)
    except docker.errors.ImageNotFound as exc:
        raise UserError(f"docker runtime: image {image} not found ({_one_line(exc)}); check --image") from None
    except docker.errors.APIError as exc:
        if gpus and "gpu" in str(exc).lower():
            raise UserError(f"docker runtime: cannot give the container GPUs ({_one_line(exc)}); install the "
                            f"NVIDIA container toolkit or drop --gpus") from None
        raise RunError(f"docker runtime: cannot start {image}: {_one_line(exc)}") from exc

    def exit_code() -> int | None:
        container.reload()
        return container.attrs["State"]["ExitCode"] if container.status in ("exited", "dead") else None

    def read_log() -> str:
        return container.logs().decode("utf-8", errors="replace")

    def cleanup(clean: bool) -> None:
        try:
            log_path.write_bytes(container.logs())
        except docker.errors.DockerException:
            pass
        try:
            container.stop(timeout=STOP_TIMEOUT_S)
        except docker.errors.DockerException:
            pass
        container.remove(force=True)
        if clean and own_log:
            log_path.unlink(missing_ok=True)

    try:
        models = wait_ready(url(host, chosen["http"]), exit_code=exit_code, read_log=read_log,
                            log_name=f"{log_path} (container {container.short_id}, {image})", timeout=ready_timeout)
    except BaseException:
        cleanup(clean=False)
        raise
    return ServerHandle(runtime="docker", repo=repo, http_url=url(host, chosen["http"]),
                        grpc_url=url(host, chosen["grpc"]), metrics_url=url(host, chosen["metrics"]),
                        log_path=log_path, command=tuple(spec["command"]), container_id=container.id, image=image,
                        models=models, _stopper=lambda: cleanup(clean=True))
