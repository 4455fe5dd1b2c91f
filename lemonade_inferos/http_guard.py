"""Request guard for inferos' local HTTP servers (the control agent and ``inferos serve``).

One ASGI middleware, :class:`GuardMiddleware`, applied before any route runs:

* **Host allow-list** – a request whose ``Host`` header names a host outside
  ``allowed_hosts`` gets 421. Loopback servers accept only loopback names, which stops
  DNS-rebinding pages (``evil.example`` resolving to 127.0.0.1) from driving them.
* **Body size limit** – a ``Content-Length`` over ``max_body`` bytes gets 413 before a byte
  is read; a chunked body is counted as it arrives and cut off at the limit (413).
* **JSON only** – a ``POST``/``PUT``/``PATCH`` with a non-empty body must say
  ``Content-Type: application/json`` (or ``*/*+json``), else 415. Browsers can send
  ``text/plain`` and form bodies cross-origin without a CORS preflight ("simple
  requests"); they cannot send ``application/json`` that way, so this stops cross-site
  POSTs from web pages.
* **Nesting depth** – a JSON body nested deeper than ``max_depth`` arrays/objects gets 400
  (Python's recursive JSON decoder and everything that walks the document would otherwise
  fail with ``RecursionError`` at about 1,000 levels, a 500).
* **Security headers** – ``X-Content-Type-Options: nosniff`` and friends on every answer.

The body is read (bounded by ``max_body``) and checked once, then replayed to the app, so
routes read it as usual. Each server renders the error in its own shape through
``error_body(status, message, details) -> dict``.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Callable, Iterable

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: default request body limit of the agent (bytes).
MAX_BODY_BYTES = 1024 * 1024
#: default JSON nesting limit (arrays + objects); OpenAI requests and policies need < 10.
MAX_JSON_DEPTH = 64
ANY_HOST = "*"

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"cache-control", b"no-store"),
]

ErrorBody = Callable[[int, str, Any], dict]

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: linear and fast
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
#: bodies larger than this are depth-checked in a worker thread (bytes)
OFF_LOOP_BYTES = 64 * 1024


def json_depth(raw: bytes) -> int:
    """Deepest array/object nesting of a JSON text (``{}`` = 1, ``[[1]]`` = 2), counting
    brackets outside strings; linear time, no recursion. For text that is not valid JSON
    the result is a bound the parser would reach before failing."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", raw))
    if not brackets:
        return 0
    import numpy as np  # only here: this module is imported by command-line parsers

    b = np.frombuffer(brackets, dtype=np.uint8)
    step = np.where((b == ord("[")) | (b == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(step).max())


def host_of(raw: str) -> str:
    """The host name of a ``Host`` header value, lower case, without port or IPv6 brackets."""
    raw = raw.strip().lower()
    if raw.startswith("["):  # [::1]:7031
        return raw[1:].split("]", 1)[0]
    if raw.count(":") == 1:
        return raw.split(":", 1)[0]
    return raw


def is_json_media_type(value: str) -> bool:
    """True for ``application/json`` and ``*/*+json`` (parameters such as charset allowed)."""
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.count("/") == 1 and media.endswith("+json"))


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> tuple[str, ...] | None:
    """The ``Host`` names a server bound to ``bind_host`` accepts: the loopback names, the
    bind address itself when it is a specific address, and ``extra``. None (any host) when
    ``extra`` contains ``"*"``."""
    extra = [h.strip().lower().strip("[]") for h in extra if h.strip()]
    if ANY_HOST in extra:
        return None
    names = list(LOOPBACK_HOSTS)
    bind = bind_host.strip().lower().strip("[]")
    if bind and bind not in ("0.0.0.0", "::") and bind not in names:
        names.append(bind)
    return tuple(dict.fromkeys([*names, *extra]))


class GuardMiddleware:
    """ASGI middleware enforcing the rules of the module docstring.

    Args:
        app: the ASGI app.
        allowed_hosts: accepted ``Host`` names (any port); None accepts any host.
        max_body: request body limit in bytes (413 above it).
        error_body: ``(status, message, details) -> dict`` rendering an error body.
        max_depth: JSON nesting limit (400 above it).
        require_json: answer 415 to a non-JSON ``Content-Type`` on a body.
    """

    def __init__(self, app: Any, *, allowed_hosts: Iterable[str] | None, error_body: ErrorBody,
                 max_body: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH, require_json: bool = True):
        if not isinstance(max_body, int) or max_body < 1:
            raise ValueError(f"max_body={max_body!r} is not allowed; must be an integer >= 1 (bytes)")
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
        self.max_body, self.max_depth, self.require_json = max_body, max_depth, require_json
        self.error_body = error_body

    async def _reject(self, send: Any, code: int, message: str, details: Any = None) -> None:
        body = json.dumps(self.error_body(code, message, details)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _too_big(self) -> tuple[int, str, str]:
        return 413, f"request body too large: the limit is {self.max_body} bytes", f"limit is {self.max_body} bytes"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.allowed is not None:
            host = host_of(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                await self._reject(send, 421, f"host {host!r} not allowed",
                                   f"Host {host!r} is not one of {sorted(self.allowed)}")
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await self._reject(send, 400, "invalid Content-Length header", length.decode("latin-1")[:50])
                return
            if n > self.max_body:
                await self._reject(send, *self._too_big())
                return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, self._secured(send))
            return
        # read the whole (bounded) body, check it, then replay it to the app
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body:  # chunked body without Content-Length
                await self._reject(send, *self._too_big())
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        raw = b"".join(chunks)
        if raw.strip():
            ctype = headers.get(b"content-type", b"").decode("latin-1")
            if self.require_json and not is_json_media_type(ctype):
                await self._reject(send, 415, "the request body must be JSON sent with Content-Type: application/json",
                                   f"Content-Type is {ctype!r}" if ctype else "no Content-Type header")
                return
            depth = json_depth(raw) if len(raw) < OFF_LOOP_BYTES else \
                await asyncio.get_running_loop().run_in_executor(None, json_depth, raw)
            if depth > self.max_depth:
                await self._reject(send, 400, f"the JSON body is nested {depth} levels deep; at most "
                                   f"{self.max_depth} are allowed", f"limit is {self.max_depth} levels")
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, self._secured(send))

    @staticmethod
    def _secured(send: Any) -> Any:
        async def secured_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                names = {k.lower() for k, _ in msg.get("headers", [])}
                msg = {**msg, "headers": [*msg.get("headers", []), *(h for h in SECURITY_HEADERS if h[0] not in names)]}
            await send(msg)

        return secured_send
