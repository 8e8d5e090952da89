"""Run the service in a background thread on loopback (tests, notebooks): ``with BackgroundServer(app) as url:``."""

from __future__ import annotations

import socket
import threading
import time


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread on ``host`` and a free port; the context value is the base URL.

    Connections get the same deadline for request headers as ``finegrain
    serve`` (``header_timeout`` seconds, see :mod:`finegrain.service.slowclients`).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0,
                 header_timeout: float | None = None):
        import uvicorn

        from .slowclients import HEADER_TIMEOUT_S, timed_h11_protocol

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.start_timeout = start_timeout
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on",
            http=timed_h11_protocol(header_timeout or HEADER_TIMEOUT_S)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"finegrain-server-{self.port}")

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
