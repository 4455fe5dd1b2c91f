"""A bounded, thread-safe LRU map for cached objects that can be rebuilt (ORT sessions
today, prefix caches later), with eviction of idle entries when memory is needed.

``get`` marks an entry used; ``put`` inserts and evicts the least recently used entries
beyond ``max_entries``. :meth:`LRUCache.evict_idle` drops entries not used for
``idle_s`` seconds (oldest first) up to ``count`` -- what the resource manager calls under
memory pressure (the AIOS ``evict_lru`` idea).  Evicted objects are only dereferenced:
a request still holding one keeps using it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import Any, Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class LRUCache(MutableMapping, Generic[V]):
    """A mutable mapping (``dict(cache)``, ``==`` with a dict, ``del``) whose reads mark
    entries used. Args: max_entries (>= 1); clock: monotonic seconds (injectable)."""

    def __init__(self, max_entries: int = 8, clock: Callable[[], float] = time.monotonic):
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries={max_entries!r} is not allowed; must be an integer >= 1")
        self.max_entries = max_entries
        self.clock = clock
        self._d: OrderedDict[Hashable, tuple[V, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, key: Hashable, default: Any = None) -> V | Any:
        with self._lock:
            item = self._d.get(key)
            if item is None:
                return default
            self._d[key] = (item[0], self.clock())
            self._d.move_to_end(key)
            return item[0]

    def __setitem__(self, key: Hashable, value: V) -> None:
        self.put(key, value)

    def __getitem__(self, key: Hashable) -> V:
        v = self.get(key, _MISSING)
        if v is _MISSING:
            raise KeyError(key)
        return v

    def __delitem__(self, key: Hashable) -> None:
        with self._lock:
            del self._d[key]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.keys())

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._d)

    def values(self) -> list[V]:
        with self._lock:
            return [v for v, _ in self._d.values()]

    def put(self, key: Hashable, value: V) -> list[Hashable]:
        """Insert/replace; returns the keys evicted to stay within ``max_entries``."""
        with self._lock:
            self._d[key] = (value, self.clock())
            self._d.move_to_end(key)
            out = []
            while len(self._d) > self.max_entries:
                k, _ = self._d.popitem(last=False)
                out.append(k)
            self.evictions += len(out)
            return out

    def evict_idle(self, idle_s: float = 0.0, count: int | None = None) -> list[Hashable]:
        """Drop entries unused for at least ``idle_s`` seconds, least recent first, at most
        ``count`` (None = all of them). Returns the evicted keys."""
        now = self.clock()
        with self._lock:
            out = []
            for k, (_, t) in list(self._d.items()):
                if count is not None and len(out) >= count:
                    break
                if now - t >= idle_s:
                    del self._d[k]
                    out.append(k)
            self.evictions += len(out)
            return out


_MISSING = object()
