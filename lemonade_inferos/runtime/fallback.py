"""The guide's automatic fallback table (§4.1 自動フォールバック表), every row implemented.

=====================  =======================  ===================================  ==========================  ==========================
row (reason)           detection                immediate action                     follow-up                   recovery
=====================  =======================  ===================================  ==========================  ==========================
``dml_missing``        available providers      prefill/decode on CPU, conservative  event to the operator,      DirectML seen again for
                       lack DirectML (after it  KV thresholds (never more            re-detect with backoff      ``dml_recover_s`` (300 s)
                       was seen, or on Windows) compression than in force)
``npu_unavailable``    NPU missing, or its      decode on DirectML                   re-check every              NPU present and below
                       temperature >= limit                                          ``npu_retry_s`` (300 s)     ``npu_max_c - hysteresis``
``quality``            measured ΔPPL >          KV back one step: INT4 -> INT8,      each further excess steps   ΔPPL within budget for
                       ``quality.max_delta_ppl`` then -> float16 (``disabled``)      once more (after backoff)   ``quality_stable_s`` (600 s)
``memory_pressure``    memory use >= ``high``   compress harder: recent window       each further excess steps   use < ``low`` (80 %)
                       (90 %) of the budget /   halved per step (>= 16), more        once more; idle sessions
                       usable host memory       eviction (L3_evict lowered)          evicted
``agent_unreachable``  HTTP timeout / error     baseline policy (the agent client    client retries with         a health check answers
                                                does it, :mod:`lemonade_inferos.     backoff
                                                client`); recorded here
``device_error``       a provider fails to      next provider in the chain, same     provider excluded with      its backoff expires
                       create a session or      request (:mod:`.providers`)          backoff
                       fails during a run
=====================  =======================  ===================================  ==========================  ==========================

Notifications (the guide's RobustFallbackManager): every trigger is an *event*
(timestamp, reason, level, detail, action); when one reason triggers
``NOTIFY_THRESHOLDS[reason]`` times within ``window_s`` (300 s) a warning is logged and a
``notification`` event emitted; ``max_consecutive`` (5) triggers of any reason within the
window put the runtime in the *critical* state (logged at error; cleared when every row
has recovered). ``counters`` count triggers per reason (exported to Prometheus).

Threshold reading: this project's ``level_thresholds`` are the fraction of old blocks kept
*better* than a level (higher = more conservative); the guide's descending examples
(0.8/0.6/0.4 = "importance above which a block stays") translate to ``1 - x``, which is
how the guide's conservative values are used below.

Clocks are injectable (``clock``: monotonic seconds), so tests drive every row in virtual time.
"""

from __future__ import annotations

import collections
import logging
import sys
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .backoff import Backoff

log = logging.getLogger("lemonade_inferos.runtime")

REASONS = ("dml_missing", "npu_unavailable", "quality", "memory_pressure", "agent_unreachable", "device_error")
BACKOFF = {  # (initial s, max s, multiplier): the guide's values; NPU retries every 5 min
    "dml_missing": (5.0, 300.0, 2.0),
    "npu_unavailable": (300.0, 300.0, 1.0),
    "quality": (2.0, 120.0, 1.5),
    "memory_pressure": (1.0, 60.0, 1.8),
    "agent_unreachable": (0.5, 30.0, 2.0),
    "device_error": (5.0, 300.0, 2.0),
}
NOTIFY_THRESHOLDS = {"quality": 3, "device_error": 2, "memory_pressure": 4, "dml_missing": 1, "npu_unavailable": 2,
                     "agent_unreachable": 3}
# the guide's conservative values (dml_unavailable row), in this project's reading (1 - x)
CONSERVATIVE_THRESHOLDS = {"L1_int8": 0.2, "L2_int4": 0.4, "L3_evict": 0.6}
CONSERVATIVE_WINDOW = 128


@dataclass
class Settings:
    dml_recover_s: float = 300.0
    npu_retry_s: float = 300.0
    npu_max_c: float = 90.0
    npu_hysteresis_c: float = 10.0
    quality_stable_s: float = 600.0
    memory_high: float = 0.90
    memory_low: float = 0.80
    window_s: float = 300.0
    max_consecutive: int = 5
    max_events: int = 200
    expect_dml: bool = sys.platform == "win32"  # DirectML missing counts although never seen


@dataclass
class RowState:
    reason: str
    active: bool = False
    level: int = 0
    since: float | None = None
    recovering_since: float | None = None
    next_check: float = 0.0
    detail: str = ""
    backoff: Backoff | None = None

    def view(self, now: float) -> dict[str, Any]:
        return {"active": self.active, "level": self.level, "detail": self.detail,
                "active_for_s": None if self.since is None else round(now - self.since, 3),
                "recovering_for_s": None if self.recovering_since is None else round(now - self.recovering_since, 3),
                "next_check_in_s": round(max(0.0, self.next_check - now), 3) if self.active else None}


@dataclass
class Observation:
    """What the mid/slow loops saw; None = not observed this time.

    Attributes:
        providers: onnxruntime's available providers.
        npu_present: an NPU is visible (provider or telemetry).
        npu_temperature_c: hottest NPU sensor.
        delta_ppl: measured ΔPPL of the policy in force (slow loop).
        memory_fraction: 0..1 use of the KV budget or usable host memory, whichever is higher.
        agent_reachable: the agent client's last fetch worked.
    """

    providers: list[str] | None = None
    npu_present: bool | None = None
    npu_temperature_c: float | None = None
    delta_ppl: float | None = None
    memory_fraction: float | None = None
    agent_reachable: bool | None = None


class FallbackManager:
    """The table above as a state machine. Thread-safe enough for one mid-loop thread plus
    request threads reading :meth:`apply` (state changes are single assignments).

    Args:
        settings: thresholds and periods.
        clock: monotonic seconds (virtual time in tests).
        wall: UNIX seconds for event timestamps.
        rng: jitter source.
        on_event: called with each event dict (e.g. forward to the agent).
        max_delta_ppl: the quality budget (default: the policy's ``quality.max_delta_ppl``).
    """

    def __init__(self, settings: Settings | None = None, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, rng: Callable[[], float] = random.random,
                 on_event: Callable[[dict[str, Any]], None] | None = None):
        self.s = settings or Settings()
        self.clock, self.wall, self.rng = clock, wall, rng
        self.on_event = on_event
        self.rows = {r: RowState(r, backoff=Backoff(*BACKOFF[r], rng=rng)) for r in REASONS}
        self.counters: collections.Counter[str] = collections.Counter()
        self.notifications: collections.Counter[str] = collections.Counter()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.s.max_events)
        self._recent: collections.deque[tuple[float, str]] = collections.deque()
        self.critical = False
        self.dml_seen = False
        self.npu_seen = False

    # -- events ---------------------------------------------------------------------------
    def _event(self, kind: str, reason: str, detail: str, **kw: Any) -> dict[str, Any]:
        ev = {"timestamp": self.wall(), "kind": kind, "reason": reason, "detail": detail, **kw}
        self.events.append(ev)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception as e:  # a broken sink must not break the runtime
                log.warning("fallback event sink failed: %s", e)
        return ev

    def trigger(self, reason: str, detail: str, *, step: bool = True) -> dict[str, Any]:
        """Enter (or step further into) a row now. Returns the event."""
        now = self.clock()
        row = self.rows[reason]
        row.level = row.level + 1 if (row.active and step) else max(row.level, 1)
        if not row.active:
            row.since = now
        row.active, row.detail, row.recovering_since = True, detail, None
        delay = row.backoff.next_delay()
        row.next_check = now + delay
        self.counters[reason] += 1
        self._recent.append((now, reason))
        while self._recent and now - self._recent[0][0] > self.s.window_s:
            self._recent.popleft()
        ev = self._event("fallback", reason, detail, level=row.level, next_check_s=round(delay, 3),
                         action=ACTIONS[reason])
        log.info("fallback %s (level %d): %s -> %s", reason, row.level, detail, ACTIONS[reason])
        n = sum(1 for _, r in self._recent if r == reason)
        if n >= NOTIFY_THRESHOLDS.get(reason, 3):
            self.notifications[reason] += 1
            log.warning("fallback %s happened %d times in %g s: %s", reason, n, self.s.window_s, RECOMMEND[reason])
            self._event("notification", reason, f"{n} times in {self.s.window_s:g} s", severity="warning",
                        recommended_action=RECOMMEND[reason])
        if len(self._recent) >= self.s.max_consecutive and not self.critical:
            self.critical = True
            log.error("runtime critical: %d fallbacks in %g s", len(self._recent), self.s.window_s)
            self._event("critical", reason, f"{len(self._recent)} fallbacks in {self.s.window_s:g} s",
                        severity="critical")
        return ev

    def recover(self, reason: str, detail: str) -> None:
        row = self.rows[reason]
        if not row.active:
            return
        row.active, row.level, row.since, row.recovering_since, row.detail = False, 0, None, None, ""
        row.backoff.reset()
        self._event("recovered", reason, detail)
        log.info("recovered from %s: %s", reason, detail)
        if self.critical and not any(r.active for r in self.rows.values()):
            self.critical = False
            self._event("critical_cleared", reason, "every row recovered")

    def _holds(self, row: RowState, ok: bool, now: float, need_s: float, detail: str) -> None:
        """Recovery condition bookkeeping: recover once ``ok`` held for ``need_s``."""
        if not row.active:
            return
        if not ok:
            row.recovering_since = None
            return
        if row.recovering_since is None:
            row.recovering_since = now
        if now - row.recovering_since >= need_s:
            self.recover(row.reason, detail)

    # -- detection ----------------------------------------------------------------------------
    def observe(self, obs: Observation, policy: Any = None) -> None:
        """Apply one observation (the mid and slow loops call this)."""
        now = self.clock()
        wants = set()
        if policy is not None:
            wants = {policy.scheduler.prefill_device, policy.scheduler.decode_device}
        if obs.providers is not None:
            has_dml = "DmlExecutionProvider" in obs.providers
            row = self.rows["dml_missing"]
            if has_dml:
                self.dml_seen = True
                self._holds(row, True, now, self.s.dml_recover_s, "DirectML available again")
            elif "dml" in wants and (self.dml_seen or self.s.expect_dml) and now >= row.next_check:
                if not row.active:
                    self.trigger("dml_missing", "DmlExecutionProvider no longer in onnxruntime's providers")
                else:  # re-detect with backoff: still missing
                    row.next_check = now + row.backoff.next_delay()
                    row.recovering_since = None
        if obs.npu_present is not None or obs.npu_temperature_c is not None:
            row = self.rows["npu_unavailable"]
            present = bool(obs.npu_present)
            self.npu_seen = self.npu_seen or present
            t = obs.npu_temperature_c
            hot = t is not None and t >= self.s.npu_max_c
            normal = present and (t is None or t < self.s.npu_max_c - self.s.npu_hysteresis_c)
            if not row.active and self.npu_seen and (hot or not present):
                self.trigger("npu_unavailable", f"NPU temperature {t:.1f} °C >= {self.s.npu_max_c:g} °C" if hot
                             else "NPU no longer present")
            elif row.active and now >= row.next_check:  # retry every npu_retry_s
                if normal:
                    self.recover("npu_unavailable", f"NPU back at {t if t is not None else 'unknown'} °C")
                else:
                    row.next_check = now + row.backoff.next_delay()
        if obs.delta_ppl is not None:
            budget = policy.quality.max_delta_ppl if policy is not None else 0.5
            row = self.rows["quality"]
            over = obs.delta_ppl > budget
            if over and (not row.active or (now >= row.next_check and row.level < 2)):
                self.trigger("quality", f"measured ΔPPL {obs.delta_ppl:.4f} > quality.max_delta_ppl {budget:g}")
            else:
                self._holds(row, not over, now, self.s.quality_stable_s, f"ΔPPL within {budget:g} for "
                            f"{self.s.quality_stable_s:g} s")
        if obs.memory_fraction is not None:
            row = self.rows["memory_pressure"]
            f = obs.memory_fraction
            if f >= self.s.memory_high and (not row.active or now >= row.next_check):
                self.trigger("memory_pressure", f"memory use {f:.0%} >= {self.s.memory_high:.0%}")
            elif row.active and f < self.s.memory_low:
                self.recover("memory_pressure", f"memory use {f:.0%} < {self.s.memory_low:.0%}")
        if obs.agent_reachable is not None:
            if not obs.agent_reachable and not self.rows["agent_unreachable"].active:
                self.trigger("agent_unreachable", "the control agent did not answer; requests run with the baseline policy")
            elif obs.agent_reachable:
                self.recover("agent_unreachable", "the agent answers again")

    def device_error(self, provider: str, error: BaseException | str) -> None:
        """A provider failed (session creation or run); :mod:`.providers` calls this."""
        self.trigger("device_error", f"{provider}: {str(error).splitlines()[0][:200] if str(error) else type(error).__name__}")

    # -- action -------------------------------------------------------------------------------
    def apply(self, policy: Any, context: Any = None) -> Any:
        """The policy with every active row's immediate action applied (validated; never
        compresses more than ``policy`` except under memory pressure, which is its purpose)."""
        rows = self.rows
        if not any(r.active for r in rows.values()):
            return policy
        kv = policy.kv
        t = kv.level_thresholds
        th = {"L1_int8": t.L1_int8, "L2_int4": t.L2_int4, "L3_evict": t.L3_evict}
        window = kv.recent_window
        part: dict[str, Any] = {}
        sched: dict[str, str] = {}
        mode = kv.mode.value if hasattr(kv.mode, "value") else str(kv.mode)
        if rows["dml_missing"].active:
            sched.update(prefill_device="cpu", decode_device="cpu")
            th = {k: max(v, CONSERVATIVE_THRESHOLDS[k]) for k, v in th.items()}
            window = max(window, CONSERVATIVE_WINDOW)
        if rows["npu_unavailable"].active and policy.scheduler.decode_device == "npu":
            sched["decode_device"] = "cpu" if rows["dml_missing"].active else "dml"
        if rows["memory_pressure"].active:
            lvl = rows["memory_pressure"].level
            window = max(16, window >> lvl)
            th["L3_evict"] = max(th["L2_int4"], round(th["L3_evict"] - 0.15 * lvl, 4))
            th["L2_int4"] = min(th["L2_int4"], th["L3_evict"])
            th["L1_int8"] = min(th["L1_int8"], th["L2_int4"])
        if rows["quality"].active:
            lvl = rows["quality"].level
            if lvl >= 2:
                mode = "disabled"  # INT8 -> float16
            else:  # INT4 -> INT8: no INT4, no eviction
                th["L2_int4"] = th["L3_evict"] = 1.0
        if sched:
            part["scheduler"] = sched
        part["kv"] = {"level_thresholds": th, "recent_window": window, "mode": mode}
        return policy.merged(part)

    def status(self, limit: int = 20) -> dict[str, Any]:
        now = self.clock()
        return {
            "critical": self.critical,
            "active": [r for r, s in self.rows.items() if s.active],
            "rows": {r: s.view(now) for r, s in self.rows.items()},
            "counters": {r: self.counters.get(r, 0) for r in REASONS},
            "notifications": {r: self.notifications.get(r, 0) for r in REASONS},
            "events": list(self.events)[-limit:],
        }


ACTIONS = {
    "dml_missing": "prefill/decode on CPU with conservative KV thresholds",
    "npu_unavailable": "decode moved to DirectML",
    "quality": "KV stepped back (INT4 -> INT8 -> float16)",
    "memory_pressure": "compress harder: smaller recent window, more eviction; idle sessions evicted",
    "agent_unreachable": "baseline policy until the agent answers",
    "device_error": "request retried on the next provider in the chain",
}
RECOMMEND = {
    "dml_missing": "check the GPU driver and onnxruntime-directml installation",
    "npu_unavailable": "check NPU cooling / driver (Ryzen AI)",
    "quality": "review the KV policy or the quality baseline",
    "memory_pressure": "lower the KV budget per request, max tokens, or concurrency; add memory",
    "agent_unreachable": "restart the control agent (inferos agent)",
    "device_error": "update the device driver or run inferos doctor",
}
