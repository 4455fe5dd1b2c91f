"""Per-client quotas and usage, persisted in the agent's SQLite file (the AIOS idea of
per-agent memory quotas, here per API client).

A *client* is the ``X-Inferos-Client`` header when given, else the API key (stored only as
``key:`` + the first 12 hex digits of its SHA-256, never the key), else ``default``.

Tables (in ``<agent state dir>/history.sqlite3``, next to the agent's own tables; WAL mode,
so the agent and ``inferos serve`` can share it):

* ``quotas(client, max_kv_bytes, max_concurrent)`` -- NULL = no limit;
* ``client_usage(client, requests, refused, kv_bytes_granted, peak_kv_bytes, last_seen)``.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_CLIENT = "default"
CLIENT_HEADER = "X-Inferos-Client"
_CLIENT_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS quotas (client TEXT PRIMARY KEY, max_kv_bytes INTEGER, max_concurrent INTEGER);
CREATE TABLE IF NOT EXISTS client_usage (
    client TEXT PRIMARY KEY, requests INTEGER NOT NULL DEFAULT 0, refused INTEGER NOT NULL DEFAULT 0,
    kv_bytes_granted INTEGER NOT NULL DEFAULT 0, peak_kv_bytes INTEGER NOT NULL DEFAULT 0, last_seen REAL);
"""


def client_id(header: str | None = None, api_key: str | None = None) -> str:
    """The client a request belongs to (see the module docstring).

    Raises:
        ValueError: the header is not 1..64 characters of ``A-Za-z0-9._:@-``.
    """
    if header is not None and header != "":
        if not _CLIENT_RE.match(header):
            raise ValueError(f"{CLIENT_HEADER}: {header[:80]!r} is not allowed; use 1-64 characters of "
                             "letters, digits and . _ : @ -")
        return header
    if api_key and api_key.lower() not in ("none", "sk-none", "-"):
        return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]
    return DEFAULT_CLIENT


@dataclass(frozen=True)
class Quota:
    client: str
    max_kv_bytes: int | None = None
    max_concurrent: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QuotaStore:
    """Quotas and usage counters in one SQLite file (thread-safe, one connection)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)

    @classmethod
    def for_agent(cls, state_dir: str | Path | None = None) -> "QuotaStore":
        """The store inside the agent's state directory (default: the agent's default)."""
        from ..agent.settings import HISTORY_FILE_NAME, default_state_dir

        return cls(Path(state_dir or default_state_dir()) / HISTORY_FILE_NAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def set(self, client: str, max_kv_bytes: int | None, max_concurrent: int | None) -> Quota:
        """Set (replace) one client's quota.

        Raises:
            ValueError: a limit is negative / zero concurrency, or the client id is invalid.
        """
        client_id(client)  # validates
        if max_kv_bytes is not None and (not isinstance(max_kv_bytes, int) or max_kv_bytes < 0):
            raise ValueError(f"max_kv_bytes={max_kv_bytes!r} is not allowed; must be an integer >= 0 or null")
        if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
            raise ValueError(f"max_concurrent={max_concurrent!r} is not allowed; must be an integer >= 1 or null")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO quotas VALUES (?, ?, ?)", (client, max_kv_bytes, max_concurrent))
        return Quota(client, max_kv_bytes, max_concurrent)

    def get(self, client: str) -> Quota:
        with self._lock:
            row = self._db.execute("SELECT max_kv_bytes, max_concurrent FROM quotas WHERE client=?", (client,)).fetchone()
        return Quota(client, *row) if row else Quota(client)

    def record(self, client: str, *, granted: int = 0, peak: int = 0, refused: bool = False, now: float | None = None) -> None:
        """Count one finished (or refused) request of ``client``; committed on return."""
        with self._lock:
            self._db.execute(
                "INSERT INTO client_usage(client, requests, refused, kv_bytes_granted, peak_kv_bytes, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(client) DO UPDATE SET requests=requests+excluded.requests, "
                "refused=refused+excluded.refused, kv_bytes_granted=kv_bytes_granted+excluded.kv_bytes_granted, "
                "peak_kv_bytes=max(peak_kv_bytes, excluded.peak_kv_bytes), last_seen=excluded.last_seen",
                (client, 0 if refused else 1, 1 if refused else 0, int(granted), int(peak), now or time.time()))

    def view(self) -> dict[str, Any]:
        """Every client with a quota or usage: ``{"clients": [{client, quota..., usage...}]}``."""
        with self._lock:
            q = {r[0]: r[1:] for r in self._db.execute("SELECT client, max_kv_bytes, max_concurrent FROM quotas")}
            u = {r[0]: r[1:] for r in self._db.execute(
                "SELECT client, requests, refused, kv_bytes_granted, peak_kv_bytes, last_seen FROM client_usage")}
        out = []
        for c in sorted(set(q) | set(u)):
            mq = q.get(c, (None, None))
            mu = u.get(c, (0, 0, 0, 0, None))
            out.append({"client": c, "max_kv_bytes": mq[0], "max_concurrent": mq[1], "requests": mu[0],
                        "refused": mu[1], "kv_bytes_granted": mu[2], "peak_kv_bytes": mu[3], "last_seen": mu[4]})
        return {"clients": out}
