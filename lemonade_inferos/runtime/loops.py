"""``policy.loops`` given meaning: three control loops with periods from the policy.

* fast (``loops.fast_ms``): per request / step -- admission and tiering. It runs inline in
  the request path (:meth:`lemonade_inferos.resources.manager.ResourceManager.admit`, the
  KV store's re-tiering); here it only applies the fallback table's actions to each
  request's policy, so its period is the request rate, not a timer.
* mid (``loops.mid_ms``): telemetry sampling, memory pressure, device health -> an
  :class:`~.fallback.Observation` for the fallback table.
* slow (``loops.slow_ms``): quality re-evaluation of the policy in force (the quality guard's
  measurement on its calibration sample) -> measured ΔPPL / KLD into metrics and the
  fallback table's quality row. One evaluation at a time; the next starts ``slow_ms``
  after the previous finished, and at least ``(1/max_duty - 1)`` × its duration later, so
  evaluation uses at most ``max_duty`` (10 %) of a core whatever the period (the default
  100 ms is shorter than one evaluation).

:meth:`ControlLoops.tick` runs whatever is due at the given time, so tests run the loops
in virtual time; :meth:`ControlLoops.start` runs them on a daemon thread with real time.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .fallback import FallbackManager, Observation

log = logging.getLogger("lemonade_inferos.runtime")


class ControlLoops:
    """Args:
        policy: callable returning the policy in force (periods are read from it each tick).
        fallback: the fallback table.
        observe: mid-loop probe -> :class:`Observation`.
        evaluate: slow-loop probe -> ``{"delta_ppl": float, "kld": float, ...}`` or None.
        clock: monotonic seconds (virtual in tests).
    """

    def __init__(self, policy: Callable[[], Any], fallback: FallbackManager, *,
                 observe: Callable[[], Observation] | None = None,
                 evaluate: Callable[[Any], dict[str, Any] | None] | None = None,
                 clock: Callable[[], float] = time.monotonic, max_duty: float = 0.1):
        self.max_duty = max_duty
        self.policy, self.fallback, self.observe, self.evaluate, self.clock = policy, fallback, observe, evaluate, clock
        self.next_mid = 0.0
        self.next_slow = 0.0
        self.runs = {"mid": 0, "slow": 0}
        self.last_quality: dict[str, Any] | None = None
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def periods_s(self) -> tuple[float, float, float]:
        lp = self.policy().loops
        return lp.fast_ms / 1e3, lp.mid_ms / 1e3, lp.slow_ms / 1e3

    def tick(self, now: float | None = None) -> list[str]:
        """Run the loops due at ``now`` (default: the clock); returns which ran."""
        now = self.clock() if now is None else now
        _, mid, slow = self.periods_s()
        ran = []
        pol = self.policy()
        if self.observe is not None and now >= self.next_mid:
            try:
                self.fallback.observe(self.observe(), pol)
            except Exception as e:  # telemetry must never take the runtime down
                self.errors += 1
                log.warning("mid loop failed: %s", e)
            self.runs["mid"] += 1
            self.next_mid = now + mid
            ran.append("mid")
        if self.evaluate is not None and now >= self.next_slow:
            t0 = time.perf_counter()
            try:
                q = self.evaluate(pol)
            except Exception as e:
                self.errors += 1
                log.warning("slow loop (quality evaluation) failed: %s", e)
                q = None
            if q is not None:
                self.last_quality = {**q, "evaluated_at": time.time(), "policy": pol.name}
                self.fallback.observe(Observation(delta_ppl=q.get("delta_ppl")), pol)
            self.runs["slow"] += 1
            spent = time.perf_counter() - t0
            self.next_slow = self.clock() + max(slow, spent * (1 / self.max_duty - 1))  # after it finished
            ran.append("slow")
        return ran

    def start(self) -> "ControlLoops":
        """Run :meth:`tick` on a daemon thread until :meth:`stop`."""
        def loop() -> None:
            while not self._stop.is_set():
                self.tick()
                _, mid, slow = self.periods_s()
                wait = max(0.001, min(self.next_mid, self.next_slow) - self.clock())
                self._stop.wait(wait)

        self._thread = threading.Thread(target=loop, name="inferos-loops", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        fast, mid, slow = self.periods_s()
        return {"periods_ms": {"fast": fast * 1e3, "mid": mid * 1e3, "slow": slow * 1e3}, "runs": dict(self.runs),
                "errors": self.errors, "quality": self.last_quality,
                "quality_note": "measured through the cached decode path on the quality guard's calibration text "
                                "(beside the metrics' prompt-NLL ΔPPL estimate)"}
