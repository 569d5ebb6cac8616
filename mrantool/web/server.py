"""`serve`: build the viewer for a store (and optional run, index) and run it with uvicorn until Ctrl+C."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from mrantool.errors import ConfigError
from mrantool.web.app import Viewer, create_app
from mrantool.web.cohort import Cohort
from mrantool.web.similar import SimilarPatches

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_viewer(store: str | Path, *, run: str | Path | None = None, index: str | Path | None = None,
                 labels: str | Path | None = None, slides: list[str] | None = None) -> Viewer:
    """The viewer's state; every problem with the inputs is raised here, before the server starts."""
    cohort = Cohort(store, run_dir=run, labels=labels, slides=slides)
    similar = SimilarPatches(index, cohort.store) if index else None
    return Viewer(cohort, similar)


def check_port(host: str, port: int) -> None:
    """One sentence when the port cannot be bound (in use, privileged, bad host)."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}.")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"Port {port} on {host} is already in use; pass a free one, e.g. --port "
                                  f"{port + 1}.") from None
            raise ConfigError(f"Cannot listen on {host}:{port} ({exc.strerror}); pass another --host or --port.") \
                from None


def url_of(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def serve(viewer: Viewer, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl+C)."""
    import uvicorn

    check_port(host, port)
    config = uvicorn.Config(create_app(viewer), host=host, port=port, log_level="warning", access_log=False)
    try:
        uvicorn.Server(config).run()
    finally:
        viewer.handles.close()
