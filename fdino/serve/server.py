"""Run the service in a background thread (notebooks, tests): a real uvicorn on 127.0.0.1.

with BackgroundServer(create_app(service)) as url:    # e.g. "http://127.0.0.1:41733"
    httpx.post(url + "/search", files={"file": open("cat.png", "rb")})
"""

from __future__ import annotations

import socket
import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """Context manager: uvicorn serving ``app`` on ``host:port`` (a free port by default) in a thread."""

    def __init__(
        self, app, *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0, **uvicorn_options
    ) -> None:
        """``uvicorn_options`` go to ``uvicorn.Config``; by default the connection limit and keep-alive
        timeout of the app's service (`fdino.serve.ServiceConfig.uvicorn_options`), as ``fdino serve`` runs."""
        import uvicorn  # noqa: PLC0415

        self.host, self.port = host, port or free_port(host)
        self.timeout = timeout
        service = getattr(getattr(app, "state", None), "service", None)
        options = {**(service.config.uvicorn_options() if service is not None else {}), **uvicorn_options}
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fdino-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server thread exited before listening on {self.url} (port taken?)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start on {self.url} within {self.timeout} s")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.timeout)


__all__ = ["BackgroundServer", "free_port"]
