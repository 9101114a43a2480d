"""A FastAPI app served by uvicorn on 127.0.0.1 (a free port) in a thread: the base of loopback test doubles."""

from __future__ import annotations

import socket
import threading
import time


class LoopbackServer:
    """Subclasses build their app and call :meth:`serve`; use as a context manager (starts, then stops)."""

    def serve(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "test double server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(5)
