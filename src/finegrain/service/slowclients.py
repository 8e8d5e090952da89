"""Deadlines for slow or silent clients, and JSON for requests too malformed to reach the app.

uvicorn's h11 protocol waits forever for the headers of a request: a client
that connects and sends nothing, or trickles a header line every few
seconds ("slowloris"), holds a connection slot indefinitely, and a few
hundred of them exhaust ``limit_concurrency`` (everyone else then gets 503).
Two deadlines close that hole:

* :func:`timed_h11_protocol` -- a uvicorn HTTP protocol whose connections
  must deliver a request's complete headers within ``header_timeout``
  seconds of connecting (or of the previous response); otherwise they get
  ``408 {"error": "request_timeout"}`` and are closed. It also answers an
  unparsable request (not HTTP at all, bad request line or headers) with a
  JSON ``400 {"error": "bad_http"}`` instead of uvicorn's plain text.
* :class:`BodyTimeout` -- ASGI middleware: each chunk of a request body must
  arrive within ``body_timeout`` seconds, and the whole body within
  ``4 * body_timeout``, otherwise the request ends with a JSON 408.

Use both with ``uvicorn.Config(app, http=timed_h11_protocol(10.0))`` (as
``finegrain serve`` and :class:`~finegrain.service.background.BackgroundServer` do).
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0  # connect (or previous response) -> complete request headers
BODY_TIMEOUT_S = 15.0  # between two chunks of a request body (the whole body: 4x this)


def _raw_json_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": code, "message": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


def timed_h11_protocol(header_timeout: float = HEADER_TIMEOUT_S) -> type[H11Protocol]:
    """A uvicorn ``H11Protocol`` subclass enforcing ``header_timeout`` and answering bad HTTP with JSON."""

    class TimedH11Protocol(H11Protocol):
        """uvicorn's h11 protocol with a deadline for request headers (see the module docstring)."""

        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._between_requests():
                self._arm_header_timer()  # the first bytes of a further request on a kept-alive connection
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if not self._between_requests():
                self._cancel_header_timer()  # the headers arrived: the app (and BodyTimeout) take over

        def send_400_response(self, msg: str) -> None:
            self._cancel_header_timer()
            self.transport.write(_raw_json_response(400, "Bad Request", "bad_http", f"malformed HTTP request: {msg}"))
            self.transport.close()

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._between_requests():
                return
            self.transport.write(_raw_json_response(
                408, "Request Timeout", "request_timeout",
                f"the request headers did not arrive within {header_timeout:g} seconds"))
            self.transport.close()

    return TimedH11Protocol


class BodyTimeout:
    """ASGI middleware: a request body that stalls gets ``408 {"error": "request_timeout"}``."""

    def __init__(self, app, timeout: float = BODY_TIMEOUT_S):
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + 4 * self.timeout
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:  # later reads only wait for a disconnect: no deadline
                return await receive()
            left = min(self.timeout, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except TimeoutError:
                raise _RequestTimeout(self.timeout) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            return await self.app(scope, timed_receive, tracking_send)
        except _RequestTimeout as exc:
            # Raised outside the app's own error handling (e.g. while another middleware drains a body).
            if started:
                return None
            body = json.dumps({"error": exc.code, "message": exc.detail}).encode()
            await send({"type": "http.response.start", "status": 408,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return None


class _RequestTimeout(HTTPException):
    """Raised inside the app while it reads a stalled body; rendered as JSON by the app's error handler."""

    def __init__(self, timeout: float):
        super().__init__(408, f"the request body stalled for more than {timeout:g} seconds",
                         headers={"Connection": "close"})
        self.code = "request_timeout"
