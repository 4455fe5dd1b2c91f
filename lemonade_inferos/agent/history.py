"""The agent's durable store: every accepted report, plus small bits of state.

One SQLite file (``<state dir>/history.sqlite3``) in WAL mode with ``synchronous=FULL``:
:meth:`HistoryStore.add_report` returns only after the transaction committed, so a report
answered with 2xx survives a crash or a restart. Retention is by row count: once more than
``max_rows`` reports are stored, the oldest are deleted in the same transaction. Lifetime
counters (reports accepted, overflow drops reported by clients) live in their own table,
so they survive retention.

Tables: ``reports(id, received_at, instance, request_id, end_time, baseline, dropped,
payload JSON)``, ``state(key, value JSON)``, ``counters(name, value)``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

from .metrics import is_baseline
from .settings import HISTORY_FILE_NAME

SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    instance TEXT NOT NULL,
    request_id TEXT NOT NULL,
    end_time REAL NOT NULL,
    baseline INTEGER NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_end_time ON reports(end_time);
CREATE UNIQUE INDEX IF NOT EXISTS reports_request ON reports(instance, request_id) WHERE request_id != '';
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class HistoryStore:
    """Thread-safe SQLite store of reports and agent state (one connection, one lock).

    Args:
        state_dir: directory for ``history.sqlite3`` (created, mode 0700).
        max_rows: reports kept; older rows are deleted on insert.
    """

    def __init__(self, state_dir: str | Path, max_rows: int = 100_000):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if sys.platform != "win32":
            try:
                os.chmod(self.dir, 0o700)
            except OSError:  # pragma: no cover
                pass
        self.path = self.dir / HISTORY_FILE_NAME
        self.max_rows = int(max_rows)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- reports ------------------------------------------------------------------
    def add_report(self, payload: dict[str, Any], received_at: float) -> tuple[int, bool]:
        """Store one validated report and commit.

        A report whose non-empty ``(instance, request_id)`` is already stored (a client retry
        after a lost answer) is not stored again. Also bumps the lifetime counters and
        applies retention, in the same transaction.

        Returns:
            ``(row_id, duplicate)``.
        """
        doc = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                if payload.get("request_id"):
                    row = cur.execute(
                        "SELECT id FROM reports WHERE instance = ? AND request_id = ?",
                        (str(payload.get("instance", "")), str(payload["request_id"])),
                    ).fetchone()
                    if row is not None:
                        if payload.get("dropped"):  # the retry may carry a newer drop count
                            self._bump(cur, "dropped_total", int(payload["dropped"]))
                        cur.execute("COMMIT")
                        return int(row[0]), True
                cur.execute(
                    "INSERT INTO reports(received_at, instance, request_id, end_time, baseline, dropped, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        received_at,
                        str(payload.get("instance", "")),
                        str(payload.get("request_id", "")),
                        float(payload["end_time"]),
                        1 if is_baseline(payload) else 0,
                        int(payload.get("dropped", 0)),
                        doc,
                    ),
                )
                row_id = int(cur.lastrowid)
                self._bump(cur, "reports_total", 1)
                if payload.get("dropped"):
                    self._bump(cur, "dropped_total", int(payload["dropped"]))
                if row_id > self.max_rows:
                    cur.execute("DELETE FROM reports WHERE id <= ?", (row_id - self.max_rows,))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return row_id, False

    @staticmethod
    def _bump(cur: sqlite3.Cursor, name: str, by: int) -> None:
        cur.execute(
            "INSERT INTO counters(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM reports").fetchone()[0])

    def counters(self) -> dict[str, int]:
        """Lifetime counters: ``reports_total``, ``dropped_total`` (0 when never bumped)."""
        with self._lock:
            rows = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return {"reports_total": int(rows.get("reports_total", 0)), "dropped_total": int(rows.get("dropped_total", 0))}

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` reports, oldest first: ``{id, received_at, stats}``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, received_at, payload FROM reports ORDER BY id DESC LIMIT ?", (int(limit),)
            ).fetchall()
        return [{"id": i, "received_at": t, "stats": json.loads(p)} for i, t, p in reversed(rows)]

    def since(self, end_time_min: float) -> list[tuple[int, float, dict[str, Any]]]:
        """Reports that ended at or after ``end_time_min``, as ``(id, received_at, payload)``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, received_at, payload FROM reports WHERE end_time >= ? ORDER BY id", (end_time_min,)
            ).fetchall()
        return [(i, t, json.loads(p)) for i, t, p in rows]

    def recent_baseline(self, n: int) -> list[tuple[int, float, dict[str, Any]]]:
        """The newest ``n`` baseline-mode reports, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, received_at, payload FROM reports WHERE baseline = 1 ORDER BY id DESC LIMIT ?", (int(n),)
            ).fetchall()
        return [(i, t, json.loads(p)) for i, t, p in reversed(rows)]

    # -- state ----------------------------------------------------------------------
    def get_state(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_state(self, values: dict[str, Any]) -> None:
        """Write several state keys in one committed transaction."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for k, v in values.items():
                    cur.execute(
                        "INSERT INTO state(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (k, json.dumps(v, allow_nan=False)),
                    )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
