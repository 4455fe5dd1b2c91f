"""The process KV budget: every request reserves its KV bytes before prefill.

Estimate (bytes a request's cache can reach, :func:`kv_bytes_estimate`): ``T`` = prompt +
max new tokens (capped at the context). Full-precision store (``kv.mode: disabled``):
``T`` × float32 K+V bytes per token. Tiered store: the tokens that always stay at float16
(sinks + recent window + one forming block) plus the older tokens split by the level
thresholds (a fraction ``L1_int8`` at float16, ``L2_int4 - L1_int8`` at INT8,
``L3_evict - L2_int4`` at INT4, the rest evicted; ``quality_optimized`` never below INT8),
each at its per-block bytes from :func:`lemonade_inferos.kv.store.block_level_bytes`
(metadata included), blocks rounded up. A ``kv.budget_bytes`` in the policy caps it.
The floor a budget-honouring store can shrink to (``dynamic``, ``latency_optimized``,
``throughput_optimized``: the store demotes and evicts until it fits) is the float16 part
alone plus one block of slack. Both are at least the prefill transient: each prefill
chunk (``runtime.prefill_chunk_tokens``) sits at float16 in the store until its blocks are
re-tiered, and while that re-tiering runs the quantized copies of its blocks exist too, so
a smaller reservation would be exceeded during prefill (both parts measured by
``benchmarks/memory_pressure.py`` before they were counted). Not counted: the short-lived copy of a quantized tier while a later re-tiering
rebuilds it (the store's accounting never shows both), and onnxruntime's activations.

Admission (:meth:`KVBudget.reserve`), in this order:

1. the estimate fits the free budget -> reserved as is;
2. the store honours a budget and the floor fits -> the request is *tightened*: it gets
   the free bytes as its ``kv.budget_bytes`` (more INT4, more eviction for that request);
3. else wait (FIFO by arrival among requests that could ever fit) up to ``timeout_s``;
4. else :class:`BudgetExceeded` with a ``retry_after_s`` hint (``inferos serve``: 503 +
   ``Retry-After``). A request whose floor exceeds the whole budget is refused at once.

The sum of reservations never passes ``total_bytes``. A reservation tracks its cache
(:meth:`Reservation.track`) so live usage is read from the store as it re-tiers.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

BUDGET_MODES = ("dynamic", "latency_optimized", "throughput_optimized")


class BudgetExceeded(RuntimeError):
    """The KV budget cannot take this request now. ``retry_after_s`` is a hint (seconds)."""

    def __init__(self, message: str, retry_after_s: float = 1.0, *, status: int = 503, code: str = "kv_budget_exceeded"):
        super().__init__(message)
        self.retry_after_s = max(1.0, float(retry_after_s))
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Estimate:
    """Bytes for one request: ``want`` (at its tiering), ``floor`` (tightest it can run at),
    ``tokens`` (T), ``tightenable`` (the store honours a per-request budget)."""

    want: int
    floor: int
    tokens: int
    tightenable: bool


def _mode(policy: Any) -> str:
    m = policy.kv.mode
    return m.value if hasattr(m, "value") else str(m)


def kv_bytes_estimate(spec: Any, policy: Any, tokens: int, prompt_tokens: int | None = None,
                      chunk_tokens: int | None = None) -> Estimate:
    """See the module docstring. ``spec``: a DecoderSpec; ``tokens``: prompt + max new;
    ``prompt_tokens``: the prompt (0/None = not counted), prefilled in runs of
    ``chunk_tokens`` (default: ``policy.runtime.prefill_chunk_tokens`` when the policy has
    it, else the whole prompt at once); both ``want`` and ``floor`` are at least the
    prefill's transient peak in the store."""
    if chunk_tokens is None:
        chunk_tokens = getattr(getattr(policy, "runtime", None), "prefill_chunk_tokens", None)
    from ..kv.store import StoreConfig, block_level_bytes

    T = max(1, min(int(tokens), int(spec.context_length)))
    mode = _mode(policy)
    if mode == "disabled" or not spec.tiered_model_path.is_file():
        b = int(spec.kv_bytes_per_token(4)) * T
        return Estimate(b, b, T, False)
    c = StoreConfig.from_policy(policy)
    lb = block_level_bytes(c, spec)
    row = lb[0] // c.block_len
    fixed_tokens = min(T, c.sink_tokens + c.recent_window + c.block_len)
    old_blocks = math.ceil(max(0, T - fixed_tokens) / c.block_len)
    t1, t2, t3 = c.thresholds
    if mode == "quality_optimized":
        t2 = t3 = 1.0
    fractions = (t1, max(0.0, t2 - t1), max(0.0, t3 - t2))

    def old_bytes(n_blocks: int) -> int:
        return int(sum(math.ceil(n_blocks * f) * lb[i] for i, f in enumerate(fractions)))

    want = fixed_tokens * row + old_bytes(old_blocks)
    floor = (min(T, c.sink_tokens + c.recent_window) + 2 * c.block_len) * row
    # prefill transient (prompt run in chunks of C tokens): L0 holds the kept float16 rows plus
    # one chunk, the tiers the prompt's older blocks so far, and while a chunk's re-tiering
    # runs, quantized copies (INT8, the larger level) of that chunk's blocks exist as well
    P = min(T, int(prompt_tokens or 0))
    C = min(P, int(chunk_tokens or P))
    transient = 0
    if P:
        transient = (min(P, fixed_tokens + C) * row
                     + old_bytes(math.ceil(max(0, P - fixed_tokens - C) / c.block_len))
                     + math.ceil(C / c.block_len) * lb[1])
    if policy.kv.budget_bytes is not None:
        want = max(min(want, int(policy.kv.budget_bytes)), min(floor, want))
    tight = mode in BUDGET_MODES
    floor = max(min(floor, want), transient)
    want = max(want, transient)
    return Estimate(want, floor if tight else want, T, tight)


@dataclass
class Reservation:
    """One request's share of the budget (bytes). ``granted`` never changes after
    admission; ``used_bytes`` reads the tracked cache's ``stats().total_bytes`` live."""

    request_id: str
    client: str
    granted: int
    estimate: Estimate
    tightened: bool
    started: float
    _budget: "KVBudget | None" = field(default=None, repr=False)
    _cache: Any = field(default=None, repr=False)
    peak_used: int = 0
    released: bool = False

    def track(self, cache: Any) -> None:
        """Read live usage from ``cache`` (a KVCache) from now on (weakly referenced)."""
        try:
            self._cache = weakref.ref(cache)
        except TypeError:
            self._cache = lambda: cache

    @property
    def used_bytes(self) -> int:
        cache = self._cache() if self._cache is not None else None
        if cache is None:
            return self.peak_used if self.released else 0
        try:
            total = getattr(cache, "total_bytes", None)
            used = int(total() if callable(total) else cache.stats().total_bytes)
        except Exception:  # a cache mid-update: report the last known value
            return self.peak_used
        self.peak_used = max(self.peak_used, used)
        return used

    def release(self) -> None:
        """Give the bytes back (idempotent)."""
        if not self.released and self._budget is not None:
            _ = self.used_bytes
            self._budget._release(self)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class KVBudget:
    """Thread-safe reservation ledger over ``total_bytes``.

    Args:
        total_bytes: the process KV budget (bytes, > 0).
        clock: monotonic seconds (injectable).
    """

    def __init__(self, total_bytes: int, clock: Callable[[], float] = time.monotonic):
        if not isinstance(total_bytes, int) or total_bytes <= 0:
            raise ValueError(f"total_bytes={total_bytes!r} is not allowed; must be a positive integer (bytes)")
        self.total_bytes = total_bytes
        self.clock = clock
        self._cv = threading.Condition()
        self._active: dict[int, Reservation] = {}
        self._queue: list[int] = []
        self._ticket = 0
        self.reserved_bytes = 0
        self.peak_reserved = 0
        self.counters = {"admitted": 0, "tightened": 0, "waited": 0, "refused": 0, "completed": 0}
        self._durations: list[float] = []
        self.latency_ms_sum = 0.0

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.reserved_bytes

    def set_total(self, total_bytes: int) -> None:
        """Change the budget (new reservations see it; existing ones keep their bytes)."""
        with self._cv:
            self.total_bytes = int(total_bytes)
            self._cv.notify_all()

    def retry_after(self) -> float:
        """Median duration of recent requests (s), at least 1."""
        d = sorted(self._durations[-32:])
        return max(1.0, d[len(d) // 2]) if d else 1.0

    def reserve(self, request_id: str, est: Estimate, *, client: str = "default", timeout_s: float | None = 30.0,
                extra_check: Callable[[int], str | None] | None = None,
                on_admit: Callable[[Reservation], None] | None = None) -> Reservation:
        """Admit one request (see the module docstring).

        Args:
            est: from :func:`kv_bytes_estimate`.
            timeout_s: longest wait in the queue (None = forever, 0 = never wait).
            extra_check: called with the bytes about to be granted, under the lock; returns
                None to allow or a reason to wait (e.g. a client quota).
            on_admit: called with the new reservation under the same lock.

        Raises:
            BudgetExceeded: cannot fit even at its floor within ``timeout_s``; or its
                floor is larger than the whole budget (refused at once).
        """
        if est.floor > self.total_bytes:
            with self._cv:
                self.counters["refused"] += 1
            raise BudgetExceeded(
                f"request {request_id} needs at least {est.floor} KV bytes for {est.tokens} tokens but the whole KV "
                f"budget is {self.total_bytes} bytes; lower max_tokens or the prompt, or raise the budget",
                retry_after_s=self.retry_after())
        deadline = None if timeout_s is None else self.clock() + timeout_s
        with self._cv:
            self._ticket += 1
            me = self._ticket
            self._queue.append(me)
            waited = False
            reason = ""
            try:
                while True:
                    grant, reason = self._try(est, me, extra_check)
                    if grant is not None:
                        break
                    remaining = None if deadline is None else deadline - self.clock()
                    if remaining is not None and remaining <= 0:
                        self.counters["refused"] += 1
                        raise BudgetExceeded(
                            f"request {request_id}: {reason}; waited {timeout_s:g} s in the queue",
                            retry_after_s=self.retry_after(),
                            status=429 if reason.startswith("client") else 503,
                            code="quota_exceeded" if reason.startswith("client") else "kv_budget_exceeded")
                    waited = True
                    self._cv.wait(timeout=remaining if remaining is not None else 1.0)
            finally:
                self._queue.remove(me)
                self._cv.notify_all()
            tightened = grant < est.want
            r = Reservation(request_id, client, grant, est, tightened, self.clock(), _budget=self)
            self._active[id(r)] = r
            self.reserved_bytes += grant
            self.peak_reserved = max(self.peak_reserved, self.reserved_bytes)
            self.counters["admitted"] += 1
            self.counters["tightened"] += int(tightened)
            self.counters["waited"] += int(waited)
            if on_admit is not None:
                on_admit(r)
            return r

    def _try(self, est: Estimate, me: int, extra_check: Callable[[int], str | None] | None) -> tuple[int | None, str]:
        free = self.free_bytes
        ahead = [t for t in self._queue if t < me]
        if ahead:
            return None, f"{len(ahead)} earlier request(s) waiting for KV budget"
        if est.want <= free:
            grant = est.want
        elif est.tightenable and est.floor <= free:
            grant = free
        else:
            return None, (f"KV budget full: needs {est.floor if est.tightenable else est.want} bytes, "
                          f"{free} of {self.total_bytes} free")
        if extra_check is not None:
            why = extra_check(grant)
            if why:
                return None, why
        return grant, ""

    def _release(self, r: Reservation) -> None:
        with self._cv:
            if r.released:
                return
            r.released = True
            self._active.pop(id(r), None)
            self.reserved_bytes -= r.granted
            dur = self.clock() - r.started
            self._durations.append(dur)
            del self._durations[:-64]
            self.latency_ms_sum += dur * 1e3
            self.counters["completed"] += 1
            self._cv.notify_all()

    def active(self) -> list[Reservation]:
        with self._cv:
            return list(self._active.values())

    def status(self) -> dict[str, Any]:
        """Budget, reserved, live used bytes, queue length, counters."""
        act = self.active()
        done = self.counters["completed"]
        return {
            "total_bytes": self.total_bytes,
            "reserved_bytes": self.reserved_bytes,
            "free_bytes": self.free_bytes,
            "used_bytes": sum(r.used_bytes for r in act),
            "peak_reserved_bytes": self.peak_reserved,
            "requests_running": len(act),
            "requests_queued": len(self._queue),
            "avg_latency_ms": round(self.latency_ms_sum / done, 3) if done else None,
            **{f"{k}_total": v for k, v in self.counters.items()},
        }
