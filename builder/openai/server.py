"""The front's HTTP server: uvicorn in a thread of the `serve` process, stopped with it."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

STARTUP_S = 60.0


class FrontServer:
    def __init__(self, repo: Path, grpc_url: str, port: int, host: str, metrics_url: str | None):
        import uvicorn

        from builder.openai.app import create_app

        self.socket = socket.create_server((host, port))  # an OSError here: the port is taken
        self.server_port = self.socket.getsockname()[1]
        config = uvicorn.Config(create_app(repo, grpc_url, metrics_url), log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="openai-front", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + STARTUP_S
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            self.shutdown()
            raise RuntimeError("the OpenAI front did not start")

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def start_front(repo: Path, grpc_url: str, port: int, host: str = "127.0.0.1",
                metrics_url: str | None = None) -> FrontServer:
    """Serve the front; `.shutdown()` stops it. Port 0 picks a free one (`.server_port`)."""
    return FrontServer(repo, grpc_url, port, host, metrics_url)
