"""The resource manager of one inference process: KV budget, admission, client quotas,
the host KV pool, the bounded caches, and the status the agent and metrics show.

The budget (bytes) is ``min(io.host_pool_bytes, fraction × available host memory)`` where
available memory is cgroup-aware (:func:`~lemonade_inferos.resources.host_memory.host_memory`);
when the decode device is DirectML it is further capped by ``io.dml_pool_bytes``. An
explicit ``budget_bytes`` overrides all of that (``inferos serve --kv-budget``).

The engine calls :meth:`ResourceManager.admit` before prefill and releases the
:class:`Admission` when the request ends; see :mod:`.budget` for the admission rules.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .budget import BudgetExceeded, KVBudget, Reservation, kv_bytes_estimate
from .lru import LRUCache
from .quotas import DEFAULT_CLIENT, QuotaStore

log = logging.getLogger("lemonade_inferos.resources")

DEFAULT_MEMORY_FRACTION = 0.5


@dataclass
class Admission:
    """What :meth:`ResourceManager.admit` returns: the policy to run with (tightened when
    the budget is short) and the reservation to release at the end."""

    policy: Any
    reservation: Reservation
    note: str = ""
    _manager: "ResourceManager | None" = field(default=None, repr=False)

    def release(self) -> None:
        if self._manager is not None:
            self._manager._release(self)


def budget_from_policy(policy: Any, available_bytes: int | None = None,
                       fraction: float = DEFAULT_MEMORY_FRACTION) -> tuple[int, str]:
    """``(bytes, how)``: the process KV budget for ``policy`` (see the module docstring)."""
    if available_bytes is None:
        from .host_memory import host_memory

        available_bytes = int(host_memory().extra["available_bytes"])
    total = int(policy.io.host_pool_bytes)
    how = f"io.host_pool_bytes={total}"
    cap = int(available_bytes * fraction)
    if cap < total:
        total, how = cap, f"{fraction:g} x available host memory ({available_bytes} bytes, cgroup-aware)"
    if policy.scheduler.decode_device == "dml" and int(policy.io.dml_pool_bytes) < total:
        total, how = int(policy.io.dml_pool_bytes), f"io.dml_pool_bytes={policy.io.dml_pool_bytes} (decode on DirectML)"
    return max(1, total), how


class ResourceManager:
    """Args:
        budget_bytes: the process KV budget (bytes).
        quotas: a :class:`QuotaStore` (None = no per-client limits, usage not persisted).
        timeout_s: longest wait in the admission queue (None = forever).
        pool: a host pool (:class:`~.pool.HostPool` / :class:`~.pool.DriverPool`) or None.
        clock: monotonic seconds.
    """

    def __init__(self, budget_bytes: int, *, quotas: QuotaStore | None = None, timeout_s: float | None = 30.0,
                 pool: Any = None, clock: Callable[[], float] = time.monotonic, how: str = "explicit"):
        self.budget = KVBudget(int(budget_bytes), clock=clock)
        self.budget_source = how
        self.quotas = quotas
        self.timeout_s = timeout_s
        self.pool = pool
        self.caches: list[LRUCache] = []
        self._lock = threading.Lock()
        self._by_request: dict[str, Reservation] = {}
        self._per_client: dict[str, list[Reservation]] = {}
        self.overrides: Callable[[Any, Any], Any] | None = None  # the adaptive runtime's policy adjustment
        self.runtime_status: Callable[[], dict[str, Any]] | None = None
        self.runtime: Any = None  # the AdaptiveRuntime ``inferos serve`` starts (attach_from_args)

    @classmethod
    def from_policy(cls, policy: Any, *, budget_bytes: int | None = None, available_bytes: int | None = None,
                    **kw: Any) -> "ResourceManager":
        if budget_bytes is None:
            budget_bytes, how = budget_from_policy(policy, available_bytes)
        else:
            how = "explicit"
        return cls(budget_bytes, how=how, **kw)

    # -- admission ---------------------------------------------------------------------
    def _quota_check(self, client: str) -> Callable[[int], str | None] | None:
        if self.quotas is None:
            return None
        q = self.quotas.get(client)
        if q.max_kv_bytes is None and q.max_concurrent is None:
            return None

        def check(grant: int) -> str | None:
            mine = self._per_client.get(client, [])
            if q.max_concurrent is not None and len(mine) >= q.max_concurrent:
                return f"client {client!r} quota: {len(mine)} of {q.max_concurrent} concurrent requests running"
            held = sum(r.granted for r in mine)
            if q.max_kv_bytes is not None and held + grant > q.max_kv_bytes:
                return f"client {client!r} quota: {held} + {grant} KV bytes > max_kv_bytes {q.max_kv_bytes}"
            return None

        return check

    def admit(self, context: Any, policy: Any, spec: Any) -> Admission:
        """Reserve KV bytes for one request; returns the policy to run it with.

        Raises:
            BudgetExceeded: refused (status 503, or 429 for a client quota), with a reason
                and ``retry_after_s``.
        """
        if self.overrides is not None:
            policy = self.overrides(policy, context) or policy
        client = str(context.extra.get("client") or DEFAULT_CLIENT)
        tokens = int(context.prompt_tokens) + int(context.max_new_tokens)
        est = kv_bytes_estimate(spec, policy, tokens, prompt_tokens=int(context.prompt_tokens))
        check = self._quota_check(client)
        if check is not None and self.quotas is not None:
            q = self.quotas.get(client)
            if q.max_kv_bytes is not None and est.floor > q.max_kv_bytes:
                self.quotas.record(client, refused=True)
                raise BudgetExceeded(f"client {client!r}: the request needs at least {est.floor} KV bytes but its quota "
                                     f"max_kv_bytes is {q.max_kv_bytes}", status=429, code="quota_exceeded")
        try:
            r = self.budget.reserve(context.request_id, est, client=client, timeout_s=self.timeout_s,
                                    extra_check=check, on_admit=self._register)
        except BudgetExceeded:
            if self.quotas is not None:
                self.quotas.record(client, refused=True)
            raise
        note = f"KV budget: reserved {r.granted} of {self.budget.total_bytes} bytes for {est.tokens} tokens"
        if r.tightened:
            policy = policy.merged({"kv": {"budget_bytes": r.granted}})
            note += f" (tightened from {est.want}: kv.budget_bytes={r.granted})"
        return Admission(policy, r, note, self)

    def track(self, request_id: str, cache: Any) -> None:
        """Read the request's live KV usage from ``cache`` (called once the cache exists)."""
        r = self._by_request.get(request_id)
        if r is not None:
            r.track(cache)

    def _register(self, r: Reservation) -> None:
        """Called by the budget under its lock, atomically with the grant."""
        with self._lock:
            self._by_request[r.request_id] = r
            self._per_client.setdefault(r.client, []).append(r)

    def _release(self, adm: Admission) -> None:
        r = adm.reservation
        if r.released:
            return
        with self.budget._cv:  # quota bookkeeping and the budget change together
            with self._lock:
                self._by_request.pop(r.request_id, None)
                lst = self._per_client.get(r.client, [])
                if r in lst:
                    lst.remove(r)
            r.release()
        if self.quotas is not None:
            self.quotas.record(r.client, granted=r.granted, peak=r.peak_used)

    # -- caches and memory ------------------------------------------------------------------
    def register_cache(self, cache: LRUCache) -> LRUCache:
        """Let the manager evict idle entries of ``cache`` under memory pressure."""
        self.caches.append(cache)
        return cache

    def relieve(self, idle_s: float = 30.0) -> int:
        """Evict idle cached objects (sessions, prefix caches); returns how many."""
        return sum(len(c.evict_idle(idle_s)) for c in self.caches)

    # -- status ---------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """:meth:`status` plus the adaptive runtime's state (when one is attached), bounded
        for a PostRun report (at most 20 recent events)."""
        out = self.status()
        out.pop("clients", None)
        if self.runtime_status is not None:
            try:
                out["runtime"] = self.runtime_status()
            except Exception as e:  # never fail a request over its report
                out["runtime"] = {"error": str(e)}
        return out

    def status(self) -> dict[str, Any]:
        """``{"kv_budget", "memory_pool", "scheduler", "clients"}`` for /v1/metrics."""
        b = self.budget.status()
        b["source"] = self.budget_source
        out: dict[str, Any] = {"kv_budget": b}
        out["memory_pool"] = self.pool.status().to_dict() if self.pool is not None else None
        out["scheduler"] = {"processes": 1, "requests_in_flight": b["requests_running"],
                            "requests_queued": b["requests_queued"], "requests_completed": b["completed_total"],
                            "avg_latency_ms": b["avg_latency_ms"], "source": "resource manager (this process)"}
        if self.quotas is not None:
            out["clients"] = self.quotas.view()["clients"]
        return out


def attach(engine: Any, rm: "ResourceManager") -> "ResourceManager":
    """Make ``engine`` admit its requests through ``rm`` (and let ``rm`` evict its idle
    sessions)."""
    engine.resources = rm
    rm.register_cache(engine._sessions)
    return rm


def use_pool(rm: "ResourceManager") -> Any:
    """Give ``rm`` a KV buffer pool and make the tiered stores allocate from it: the
    /dev/inferos driver's pinned pool when the driver is present, else a host pool of the
    budget's size (page-locked where ``RLIMIT_MEMLOCK`` allows; see :mod:`.pool`)."""
    from ..kv.store import set_buffer_allocator
    from .kernel_driver import _client
    from .pool import DriverPool, HostPool

    pool = None
    mod = _client()
    if mod is not None:
        try:
            pool = DriverPool(mod.InferosDriver.open())
        except OSError as e:
            log.info("driver pinned pool not used: %s", getattr(e, "reason", e))
    if pool is None:
        pool = HostPool(rm.budget.total_bytes)
        if pool.note:
            log.info("KV pool: %s", pool.note)
    rm.pool = pool
    set_buffer_allocator(pool.zeros)
    return pool


def attach_from_args(engine: Any, args: Any) -> "ResourceManager":
    """``inferos serve``'s resource manager: budget from ``--kv-budget`` or the policy and
    available memory, quotas in the agent's SQLite file, ``--admission-timeout``.

    Raises:
        ValueError: ``--kv-budget`` is not a size.
    """
    from ..policy import parse_size

    budget = None if args.kv_budget is None else parse_size(args.kv_budget, field="--kv-budget")
    if budget == 0:
        raise ValueError("--kv-budget 0 is not allowed; give a positive size such as 512MiB")
    try:
        quotas: QuotaStore | None = QuotaStore.for_agent()
    except Exception as e:  # an unwritable state dir must not stop serving
        log.warning("client quotas disabled: cannot open the agent's state file: %s", e)
        quotas = None
    rm = ResourceManager.from_policy(engine.policy, budget_bytes=budget, quotas=quotas,
                                     timeout_s=args.admission_timeout or None)
    use_pool(rm)
    log.info("KV budget %d bytes (%s)", rm.budget.total_bytes, rm.budget_source)
    attach(engine, rm)
    if not getattr(args, "no_runtime", False):
        from ..runtime import AdaptiveRuntime

        agent = engine.pm.pm.get_plugin("inferos.agent") if hasattr(engine.pm, "pm") else None
        rm.runtime = AdaptiveRuntime(engine, agent=agent)
        rm.runtime.loops.start()
    return rm
