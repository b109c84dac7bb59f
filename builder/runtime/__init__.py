"""Serving a model repository: start and stop a Triton server, wait for readiness, self-check it.

    from builder.runtime import start_server, self_check
    with start_server(repo) as server:       # local tritonserver, or runtime="docker"
        results = self_check(server, repo)   # RunError listing every failing model

Heavy imports (tritonclient, docker) happen inside the functions that need them.
"""

from builder.runtime.docker import container_spec, docker_available
from builder.runtime.selfcheck import CheckResult, self_check
from builder.runtime.server import DEFAULT_IMAGE, RUNTIMES, ServerHandle
from builder.runtime.start import start_server

__all__ = ["CheckResult", "DEFAULT_IMAGE", "RUNTIMES", "ServerHandle", "container_spec", "docker_available",
           "self_check", "start_server"]
