"""Running the agent with uvicorn: in the foreground (``inferos agent``) or in a thread.

Binding rule: loopback addresses (127.0.0.0/8, ::1, ``localhost``) are always allowed. Any
other address is refused unless ``allow_remote`` is set *and* a token was provisioned by the
user (``INFEROS_AGENT_TOKEN`` or an existing token file) — a remote client needs a token it
can be given, and an address other than loopback widens who can try it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Any

from . import DEFAULT_HOST, DEFAULT_PORT
from .auth import configured_token, fingerprint, load_or_create_token

log = logging.getLogger("lemonade_inferos.agent")


class BindError(ValueError):
    """The requested bind address is not allowed (message says why and what to do)."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> None:
    """Raise :class:`BindError` unless ``host`` may be bound (see the module docstring)."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise BindError(
            f"refusing to bind {host!r}: the agent listens on loopback only (127.0.0.1, ::1, localhost); "
            "pass --allow-remote (with a configured token) to listen on other addresses"
        )
    tok, _ = configured_token()
    if tok is None:
        raise BindError(
            f"refusing to bind {host!r} with --allow-remote: no token is configured; set INFEROS_AGENT_TOKEN "
            "or create the token file first (run the agent once on loopback)"
        )


def default_port() -> int:
    """``INFEROS_AGENT_PORT`` or 7031."""
    raw = os.environ.get("INFEROS_AGENT_PORT")
    if not raw:
        return DEFAULT_PORT
    try:
        port = int(raw)
    except ValueError:
        raise BindError(f"INFEROS_AGENT_PORT={raw!r} is not a port number (1..65535)") from None
    if not 0 < port < 65536:
        raise BindError(f"INFEROS_AGENT_PORT={port} is out of range (1..65535)")
    return port


def free_port(host: str = DEFAULT_HOST) -> int:
    """A currently free TCP port on ``host`` (for tests and ad-hoc agents)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _uvicorn_config(app: Any, host: str, port: int, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, server_header=False,
        lifespan="on", timeout_graceful_shutdown=5,
    )


def build_app(
    *,
    host: str = DEFAULT_HOST,
    allow_remote: bool = False,
    token: str | None = None,
    **kwargs: Any,
) -> Any:
    """Check the bind address, resolve the token, and create the app (kwargs → create_app)."""
    from .app import LOOPBACK_HOSTS, create_app

    check_bind(host, allow_remote)
    if token is None:
        token, source = load_or_create_token()
        log.info("agent token from %s (%s)", source, fingerprint(token))
    allowed = LOOPBACK_HOSTS if is_loopback(host) else None
    return create_app(token=token, allowed_hosts=allowed, **kwargs)


def serve(
    *,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    allow_remote: bool = False,
    log_level: str = "warning",
    **kwargs: Any,
) -> None:
    """Run the agent in the foreground until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    port = default_port() if port is None else port
    app = build_app(host=host, allow_remote=allow_remote, **kwargs)
    uvicorn.Server(_uvicorn_config(app, host, port, log_level)).run()


class BackgroundAgent:
    """A real agent (uvicorn, loopback) in a daemon thread; a context manager.

    ``start()`` returns once the socket accepts connections; ``stop()`` shuts it down
    gracefully. Restartable on the same port (``start()`` again after ``stop()``).

    Example::

        with BackgroundAgent(state_dir=tmp, token="x" * 32) as agent:
            requests.get(agent.url + "/v1/health")
    """

    def __init__(self, *, host: str = DEFAULT_HOST, port: int | None = None, startup_timeout: float = 15.0,
                 **app_kwargs: Any):
        self.host = host
        self.port = port or free_port(host)
        self.app_kwargs = app_kwargs
        self.startup_timeout = startup_timeout
        self.app: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    def start(self) -> "BackgroundAgent":
        import uvicorn

        self.app = build_app(host=self.host, **self.app_kwargs)
        self._server = uvicorn.Server(_uvicorn_config(self.app, self.host, self.port, "warning"))
        self._thread = threading.Thread(target=self._server.run, name=f"inferos-agent-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"agent on {self.url} failed to start (port in use?)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent on {self.url} did not start within {self.startup_timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover - stuck connection
                self._server.force_exit = True
                self._thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> "BackgroundAgent":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

