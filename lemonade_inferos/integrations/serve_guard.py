"""``inferos serve``'s request guard and off-loop request parsing.

The guard is the shared :class:`lemonade_inferos.http_guard.GuardMiddleware` (the control
agent uses the same one) with OpenAI-shaped error bodies:

* ``Host`` must be a loopback name, the bound address, or a name given with
  ``--allowed-host`` (``--allowed-host '*'`` accepts any: deliberate remote use) → else 421;
* bodies over ``--max-body-bytes`` (default 8 MiB) → 413, before the body is read;
* a body that is not ``Content-Type: application/json`` → 415 (blocks cross-site "simple"
  POSTs from web pages);
* JSON nested deeper than 64 levels → 400.

Parsing (``json.loads``) and tokenization run in worker threads (:func:`off_loop`), so a
large prompt never stalls ``/health`` or other requests on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, Callable, Iterable, TypeVar

from ..http_guard import LOOPBACK_HOSTS, MAX_JSON_DEPTH, GuardMiddleware, allowed_hosts_for  # noqa: F401

#: default request body limit of ``inferos serve`` (bytes): room for a 128K-token prompt.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024

_CODES = {413: "request_too_large", 415: "unsupported_media_type", 421: "host_not_allowed"}

T = TypeVar("T")


def openai_error(status: int, message: str, details: Any = None) -> dict[str, Any]:
    """The guard's rejection in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``."""
    msg = message if details is None else f"{message} ({details})"
    return {"error": {"message": msg, "type": "invalid_request_error", "param": None,
                      "code": _CODES.get(status)}}


def add_guard(app: Any, *, allowed_hosts: Iterable[str] | None, max_body_bytes: int) -> None:
    """Install the request guard on ``app`` (see the module docstring).

    Raises:
        ValueError: ``max_body_bytes`` is not an integer >= 1.
    """
    app.add_middleware(GuardMiddleware, allowed_hosts=allowed_hosts, error_body=openai_error,
                       max_body=max_body_bytes, max_depth=MAX_JSON_DEPTH)


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run CPU work (JSON parsing, chat templating, tokenization) in a worker thread so the
    event loop keeps answering; exceptions propagate unchanged."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))


def parse_json_object(raw: bytes) -> dict:
    """The request body as a JSON object.

    Raises:
        ValueError: not UTF-8 JSON, nested too deeply, or not an object (message says which).
    """
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # the guard limits depth; this is a second line
        raise ValueError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    return body
