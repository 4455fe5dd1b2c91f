"""Provider failover inside one request: a provider that fails to create a session, or
fails during a run, is excluded (with per-provider exponential backoff) and the same
request continues on the next provider of the chain; CPU is the last resort.

The engine asks :meth:`ProviderFailover.available` for the providers to offer the policy
(excluded ones filtered out), creates sessions through :meth:`ProviderFailover.create`,
and calls :meth:`ProviderFailover.run_failed` when a run raises. ``factory`` is
``onnxruntime.InferenceSession`` (tests inject faults by wrapping it).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from .backoff import Backoff

log = logging.getLogger("lemonade_inferos.runtime")
CPU = "CPUExecutionProvider"


class ProviderFailover:
    """Args: fallback: a :class:`~.fallback.FallbackManager` to count ``device_error`` in;
    clock: monotonic seconds; factory: the session constructor."""

    def __init__(self, fallback: Any = None, *, clock: Callable[[], float] = time.monotonic,
                 factory: Callable[..., Any] | None = None):
        self.fallback = fallback
        self.clock = clock
        self.factory = factory
        self._excluded: dict[str, float] = {}
        self._backoff: dict[str, Backoff] = {}
        self.failures: collections.Counter[str] = collections.Counter()
        self.retries = 0
        self._lock = threading.Lock()

    def excluded(self) -> tuple[str, ...]:
        """Providers excluded now (their backoff has not expired)."""
        now = self.clock()
        with self._lock:
            for p, until in list(self._excluded.items()):
                if until <= now:
                    del self._excluded[p]
                    log.info("provider %s may be tried again", p)
            return tuple(sorted(self._excluded))

    def available(self, providers: list[str]) -> list[str]:
        ex = set(self.excluded())
        return [p for p in providers if p not in ex]

    def _fail(self, provider: str, error: BaseException) -> None:
        with self._lock:
            b = self._backoff.setdefault(provider, Backoff(5.0, 300.0, 2.0))
            self._excluded[provider] = self.clock() + b.next_delay()
            self.failures[provider] += 1
        log.warning("provider %s failed (%s); continuing on the next provider", provider,
                    str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
        if self.fallback is not None:
            self.fallback.device_error(provider, error)

    def create(self, path: str, sess_options: Any, providers: list[tuple[str, dict]]) -> Any:
        """A session on the first provider of ``providers`` that can create one.

        Raises:
            the last provider's error when every provider (CPU included) failed.
        """
        import onnxruntime as ort

        factory = self.factory or ort.InferenceSession
        chain = list(providers)
        while True:
            try:
                return factory(path, sess_options=sess_options, providers=[p for p, _ in chain],
                               provider_options=[o for _, o in chain])
            except Exception as e:
                head = chain[0][0]
                if head == CPU or len(chain) == 1:
                    raise
                self._fail(head, e)
                self.retries += 1
                chain = chain[1:]

    def run_failed(self, session: Any, error: BaseException) -> bool:
        """Record a run failure on ``session``'s provider. True when the request may retry
        on another provider (the failing one was not CPU)."""
        provider = session.get_providers()[0]
        if provider == CPU:
            return False
        self._fail(provider, error)
        self.retries += 1
        return True

    def status(self) -> dict[str, Any]:
        return {"excluded": list(self.excluded()), "failures": dict(self.failures), "retries": self.retries}
