"""Slow clients cannot hold the server: a deadline for each request's head and body, and a cap on open connections.

    connection opens / next request's first byte --(header_timeout)--> request head complete
    request head complete --(body_timeout)--> request body complete
    response sent --(keep_alive_timeout, uvicorn's own)--> next request's first byte, else the connection closes

Why a subclass of uvicorn's h11 protocol and not an ASGI middleware: the ASGI app is called only once a request's
head is complete, so a client that sends half a request line (or headers without the blank line that ends them) and
stalls is invisible to any middleware; only the protocol sees those bytes arrive, so only it can time them. The body
deadline lives here too, so one mechanism times the whole request and also covers a body that no handler reads
(an ASGI-level timeout on `receive()` would miss a client trickling the body of a GET). A timed-out request is
answered 408 with OpenAI's error body when no response has started, then the connection is closed.

The cap: a connection accepted while `max_connections` are already open is served a 503 (OpenAI's body,
`Retry-After`, `Connection: close`) for its request, read under the same header deadline. uvicorn's own
`limit_concurrency` does the same with a plain-text body, which would break the rule that every error has
OpenAI's body.
"""

from __future__ import annotations

import asyncio
import http
import json
from typing import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

REASONS = ("header_timeout", "body_timeout", "max_connections")  # why a connection was refused
# Set (True) in the ASGI scope of a request whose body timed out: the app, which then reads a disconnect, counts the
# request as the 408 the client got.
TIMED_OUT = "ditserve.body_timed_out"


def error_response(status: int, message: str, code: str, extra: dict[str, str] | None = None
                   ) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, body) of a `Connection: close` answer with OpenAI's error body."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "server_error", "param": None, "code": code}}).encode()
    headers = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close",
               **(extra or {})}
    return [(k.encode("ascii"), v.encode("ascii")) for k, v in headers.items()], body


def guarded_protocol(header_timeout: float, body_timeout: float, max_connections: int,
                     on_refused: Callable[[str], None] = lambda reason: None) -> type[H11Protocol]:
    """The h11 protocol class for `uvicorn.Config(http=...)` with these deadlines (seconds) and cap;
    `on_refused(reason)` is called (on the event loop) for each connection refused, reason one of REASONS."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {
        "header_timeout": header_timeout, "body_timeout": body_timeout, "max_connections": max_connections,
        "on_refused": staticmethod(on_refused)})


class _GuardedH11Protocol(H11Protocol):
    header_timeout: float
    body_timeout: float
    max_connections: int
    on_refused: Callable[[str], None]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._timed_cycle = None  # the request whose head arrived last (its body is what the body deadline times)
        if len(self.connections) > self.max_connections:
            self.app = self._over_capacity  # this connection's request gets a 503, then the connection closes
        self._arm(self.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Bytes between requests begin the next request's head (uvicorn cancels its keep-alive timer on them).
        if (self.cycle is None or self.cycle.response_complete) and self._deadline is None:
            self._arm(self.header_timeout, self._head_timed_out)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and cycle is not self._timed_cycle:  # a request head arrived
            self._timed_cycle = cycle
            self._cancel()
            if cycle.more_body:
                self._arm(self.body_timeout, self._body_timed_out)
        elif cycle is not None and not cycle.more_body and self._deadline is not None \
                and not cycle.response_complete:  # the body is complete
            self._cancel()

    # ---------------------------------------------------------------------------------------------- deadlines

    def _arm(self, seconds: float, callback) -> None:
        self._cancel()
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.on_refused("header_timeout")
            self._refuse(f"the request head did not arrive within {self.header_timeout:g} s")

    def _body_timed_out(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        self.on_refused("body_timeout")
        if cycle.response_complete:  # answered without its body, which still trickles in: stop reading it
            self.transport.close()
        elif cycle.response_started:  # the handler answers without the body: close once it is done
            cycle.keep_alive = False
        else:
            cycle.scope[TIMED_OUT] = True  # type: ignore[literal-required]
            self._refuse(f"the request body did not arrive within {self.body_timeout:g} s")

    def _refuse(self, message: str) -> None:
        """Answer 408 (no response has started on this connection) and close."""
        headers, body = error_response(408, message, "request_timeout")
        head = [f"HTTP/1.1 408 {http.HTTPStatus(408).phrase}".encode("ascii")] + [k + b": " + v for k, v in headers]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()

    async def _over_capacity(self, scope, receive, send) -> None:
        self.on_refused("max_connections")
        headers, body = error_response(503, f"the server has {self.max_connections} connections open (its "
                                            f"--max-connections); retry shortly", "too_many_connections",
                                       {"retry-after": "1"})
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
