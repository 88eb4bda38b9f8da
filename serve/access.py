"""Local-server protection: checks every request passes before its handler runs and before its body is read.

A GPU server on 127.0.0.1 is reachable by every web page its user visits. A browser lets any page send "simple"
cross-origin requests (a GET, or a POST with a text/plain, form or multipart body) without asking the server first,
and a DNS-rebinding page (a hostile name that resolves to 127.0.0.1) can even read the answers. So:
- a `Host` that names neither loopback, the bound address nor a configured name is refused (rebinding);
- POST and PATCH take only their route's content type (JSON, or octet-stream for uploads), which no simple request
  can carry, so every cross-origin call needs the CORS preflight, and only admitted origins pass that;
- with an API token, every API route needs `Authorization: Bearer <token>` (a preflight carries none: CORS decides).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Any

import psutil
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from serve.errors import HostNotAllowed, Unauthorized, WrongContentType
from serve.settings import AccessSettings

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})
PUBLIC_OPT = "public"
"""Route opt: answered without the token (health, the browser page and its files, the API docs)."""
BODY_MEDIA_TYPE_OPT = "body_media_type"
"""Route opt: the content type a POST or PATCH must declare; JSON when not set."""
JSON = "application/json"
PUBLIC_PATH_PREFIXES = ("/schema",)  # the OpenAPI routes belong to Litestar, so they cannot carry our opt


def host_name(header: str) -> str:
    """The name in a Host header: no port, no IPv6 brackets, lower case, no trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1:].split("]", 1)[0]
    elif header.count(":") == 1:
        name = header.split(":", 1)[0]
    else:
        name = header
    return name.rstrip(".")


def allowed_hosts(bind_host: str, configured: Iterable[str]) -> frozenset[str]:
    """Loopback names, the configured ones, and what a client may call the bound address."""
    names = set(LOOPBACK_NAMES) | {host_name(name) for name in configured}
    host = host_name(bind_host)
    if host in WILDCARD_ADDRESSES:
        # Bound to every interface: clients name the machine by one of its addresses or by its host name.
        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                if address.family in (socket.AF_INET, socket.AF_INET6):
                    names.add(address.address.split("%", 1)[0].lower())
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(host)
    return frozenset(names)


def is_loopback(bind_host: str) -> bool:
    host = host_name(bind_host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: assume it reaches beyond this machine


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


class RequestGate(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, access: AccessSettings, bind_host: str) -> None:
        self.hosts = allowed_hosts(bind_host, access.allowed_hosts)
        self._token = access.api_token.encode() if access.api_token else None

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        headers = Headers.from_scope(scope)
        self._check_host(headers.get("host"))
        method = scope["method"]
        if method != "OPTIONS":
            route_opt: dict[str, Any] = scope["route_handler"].opt
            public = route_opt.get(PUBLIC_OPT) or scope["path"].startswith(PUBLIC_PATH_PREFIXES)
            if self._token is not None and not public:
                self._check_token(headers.get("authorization"))
            if method in ("POST", "PATCH", "PUT"):
                _check_content_type(headers.get("content-type"), route_opt.get(BODY_MEDIA_TYPE_OPT, JSON))
        await next_app(scope, receive, send)

    def _check_host(self, header: str | None) -> None:
        if header is None:
            raise HostNotAllowed("the request has no Host header; send one naming this server")
        if host_name(header) not in self.hosts:
            raise HostNotAllowed(
                f"this server does not answer to the host name {header[:100]!r}; use localhost or its address, or "
                "start it with --allowed-host NAME"
            )

    def _check_token(self, header: str | None) -> None:
        assert self._token is not None
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise Unauthorized(
                "this server requires its API token: send 'Authorization: Bearer <token>' "
                "(the browser page: open it as /#token=<token>)"
            )


def _check_content_type(header: str | None, expected: str) -> None:
    if media_type(header) != expected:
        raise WrongContentType(
            f"send this request with 'Content-Type: {expected}' (got {media_type(header) or 'none'!r}); "
            + ("the body is the file's bytes" if expected != JSON else "the body, if any, is a JSON object")
        )
