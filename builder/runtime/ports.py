"""Ports for a server: check the ones asked for, pick free ones for the rest."""

from __future__ import annotations

import errno
import socket
from contextlib import ExitStack

from builder.errors import UserError

# endpoint -> the CLI option that sets it (quoted in errors)
ENDPOINTS = {"http": "--http-port", "grpc": "--grpc-port", "metrics": "--metrics-port"}


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Like the server will: a port left in TIME_WAIT is free, one with a listener is not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def resolve_ports(host: str, requested: dict[str, int | None]) -> dict[str, int]:
    """Ports for every endpoint of `requested` (keys of ENDPOINTS): given ones checked, None picked.

    Raises UserError naming the option when a given port is invalid, repeated or in use.
    """
    given = {k: v for k, v in requested.items() if v is not None}
    seen: dict[int, str] = {}
    for name, port in given.items():
        if not 0 < port < 65536:
            raise UserError(f"port {port} is not a valid port number (1-65535); pick another with {ENDPOINTS[name]}")
        if port in seen:
            raise UserError(f"port {port} is given for both {ENDPOINTS[seen[port]]} and {ENDPOINTS[name]}; "
                            f"give each endpoint its own port")
        seen[port] = name
    out: dict[str, int] = {}
    with ExitStack() as held:  # keep every socket bound until all are chosen: no duplicates
        for name, port in given.items():
            try:
                held.enter_context(_bind(host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise UserError(f"port {port} is in use; pick another with {ENDPOINTS[name]}") from None
                if exc.errno == errno.EACCES:
                    raise UserError(f"port {port} needs privileges to bind; pick one above 1023 with "
                                    f"{ENDPOINTS[name]}") from None
                raise UserError(f"cannot bind {host}:{port} ({exc.strerror}); check --host or pick another port "
                                f"with {ENDPOINTS[name]}") from None
            out[name] = port
        for name, port in requested.items():
            if port is None:
                sock = held.enter_context(_bind(host, 0))
                out[name] = sock.getsockname()[1]
    return {name: out[name] for name in requested}


def client_host(host: str) -> str:
    """The address a client on this machine uses to reach a server listening on `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def url(host: str, port: int) -> str:
    """tritonclient style: host:port, no scheme; IPv6 in brackets."""
    h = client_host(host)
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"
