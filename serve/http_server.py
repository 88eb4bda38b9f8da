"""The HTTP server under both fronts (`wanrt serve`, `wanrt cluster serve`): uvicorn's h11 protocol with deadlines on
what a slow client sends.

uvicorn bounds only the idle time after a response (`timeout_keep_alive`). A connection that opens and sends nothing,
sends its headers a byte at a time, or stops in the middle of a body, is held open for good, and a few hundred of them
use up the process's file descriptors: the page and the API stop answering. So, as nginx's `client_header_timeout`
and `client_body_timeout` do:
- a request head (request line and headers) must be complete within `header_timeout_s` of the connection opening, or
  of its first byte on a kept-alive connection; otherwise the client gets 408 and the connection is closed;
- a body must not pause longer than `body_timeout_s` between two reads (while the server is reading it: not while
  the application is busy and has paused reading); otherwise the connection is closed, which the route sees as the
  client gone. A whole upload over a slow link may take as long as it needs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from litestar import Litestar
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.settings import RequestLimits

log = logging.getLogger(__name__)


class DeadlineProtocol(H11Protocol):
    """H11Protocol with the deadlines above (their lengths set per server by `protocol_class`)."""

    header_timeout_s: float = RequestLimits.header_timeout_s
    body_timeout_s: float = RequestLimits.body_timeout_s

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a head still arriving (or the first bytes of the next one)
            self._arm_head()
            return
        self._cancel_head()
        self._cancel_body()
        if self.conn.their_state is h11.SEND_BODY:  # the rest of the body: the clock restarts with each read
            self._body_deadline = self.loop.call_later(self.body_timeout_s, self._body_too_slow)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel_head()  # idle until the next request: uvicorn's keep-alive timeout bounds that
        self._cancel_body()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head()
        self._cancel_body()
        super().connection_lost(exc)

    def _arm_head(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _cancel_head(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _cancel_body(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE or self.conn.our_state is not h11.IDLE:
            return
        host, port = self.client or ("?", 0)
        log.info("%s:%s sent no complete request head in %g s; answered 408", host, port, self.header_timeout_s)
        body = f"request head not received within {self.header_timeout_s:g} s\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        self.transport.write(self.conn.send(h11.Response(status_code=408, headers=headers)))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()

    def _body_too_slow(self) -> None:
        self._body_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:  # the application has not taken what came: the client is not the slow one
            self._body_deadline = self.loop.call_later(self.body_timeout_s, self._body_too_slow)
            return
        host, port = self.client or ("?", 0)
        log.info("%s:%s paused its request body for %g s; closing it", host, port, self.body_timeout_s)
        self.transport.close()  # the route's next read sees the client gone (a response now could race the route's)


def protocol_class(limits: RequestLimits) -> type[DeadlineProtocol]:
    timeouts = {"header_timeout_s": limits.header_timeout_s, "body_timeout_s": limits.body_timeout_s}
    return type("DeadlineProtocol", (DeadlineProtocol,), timeouts)


class HeadAsGet:
    """HEAD answered as the GET it asks about, without the body (RFC 9110 §9.3.2: every general-purpose server
    supports both). Litestar routes a HEAD to a GET-only route as 405, so a load balancer's or monitor's
    `HEAD /health` failed. The application sees GET; uvicorn, whose scope still says HEAD, sends the GET's status
    and headers (its Content-Length too) and drops the body."""

    def __init__(self, app: Litestar) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


def run_http(app: Litestar, host: str, port: int, limits: RequestLimits, log_level: str) -> None:
    uvicorn.run(HeadAsGet(app), host=host, port=port, log_level=log_level, http=protocol_class(limits))
