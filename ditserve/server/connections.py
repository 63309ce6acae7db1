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

from uvicorn.protocols.http.h11_impl import H11Protocol


def error_bytes(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """(head, body) of a `Connection: close` response with OpenAI's error body."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "server_error", "param": None, "code": code}}).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii"), body


def guarded_protocol(header_timeout: float, body_timeout: float, max_connections: int) -> type[H11Protocol]:
    """The h11 protocol class for `uvicorn.Config(http=...)` with these deadlines (seconds) and cap."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {
        "header_timeout": header_timeout, "body_timeout": body_timeout, "max_connections": max_connections})


class _GuardedH11Protocol(H11Protocol):
    header_timeout: float
    body_timeout: float
    max_connections: int

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
        self._refuse(f"the request head did not arrive within {self.header_timeout:g} s")

    def _body_timed_out(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        if cycle.response_complete:  # answered without its body, which still trickles in: stop reading it
            self.transport.close()
        elif cycle.response_started:  # the handler answers without the body: close once it is done
            cycle.keep_alive = False
        else:
            self._refuse(f"the request body did not arrive within {self.body_timeout:g} s")

    def _refuse(self, message: str) -> None:
        """Answer 408 (no response has started on this connection) and close."""
        if self.transport.is_closing():
            return
        head, body = error_bytes(408, message, "request_timeout")
        self.transport.write(head + body)
        self.transport.close()

    async def _over_capacity(self, scope, receive, send) -> None:
        head, body = error_bytes(503, f"the server has {self.max_connections} connections open (its "
                                      f"--max-connections); retry shortly", "too_many_connections",
                                 {"retry-after": "1"})
        headers = [tuple(line.split(": ", 1)) for line in head.decode("ascii").split("\r\n")[1:] if line]
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(k.encode("ascii"), v.encode("ascii")) for k, v in headers]})
        await send({"type": "http.response.body", "body": body})
