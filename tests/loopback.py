"""A FastAPI app served by uvicorn on 127.0.0.1 (a free port) in a thread: the base of loopback test doubles."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from fastapi import FastAPI, Request


class LoopbackServer:
    """Subclasses build their app and call :meth:`serve`; use as a context manager (starts, then stops)."""

    def serve(self, app, port: int | None = None) -> None:
        """Serve ``app`` on ``port`` (default: a free one) once entered."""
        import uvicorn

        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
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


class FakeOpenAIServer(LoopbackServer):
    """TEST DOUBLE of ``vllm serve``: an OpenAI-compatible ``/v1/models`` (serving ``model``) and
    ``/v1/chat/completions`` whose reply is ``answer(body)``, after ``delay_s`` seconds (many requests at once,
    as vLLM batches them). Records every request body (``requests``) and the most requests in flight."""

    def __init__(self, model: str, answer, delay_s: float = 0.0):
        self.model, self.delay_s = model, delay_s
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                "owned_by": "test-double"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self.lock:
                self.requests.append(body)
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            await asyncio.sleep(self.delay_s)
            with self.lock:
                self.in_flight -= 1
            return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer(body)}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        self.serve(app)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
