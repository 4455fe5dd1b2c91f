"""Durability and concurrency: every 2xx report is stored and counted exactly once, history
and policy survive a restart, WAL mode, retention by row count."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from lemonade_inferos.agent.history import HistoryStore
from lemonade_inferos.agent.server import BackgroundAgent
from lemonade_inferos.types import KVStats, RunStats

TOKEN = "history-token-" + "h" * 20
AUTH = {"X-Inferos-Token": TOKEN}
N_CONCURRENT = 200


def body(i: int, instance: str = "inst-a") -> dict:
    now = time.time()
    s = RunStats(request_id=f"r{i}", start_time=now - 0.5, end_time=now, prompt_tokens=4, generated_tokens=i % 7 + 1,
                 ttft_ms=5.0, total_ms=500.0, kv=KVStats(total_bytes=1000, fp16_bytes=2000, store="tiered"))
    return {**s.to_dict(), "instance": instance}


def test_concurrent_posts_are_all_counted_exactly(tmp_path: Path) -> None:
    with BackgroundAgent(state_dir=tmp_path, token=TOKEN) as agent:
        def post(i: int) -> int:
            with requests.Session() as s:
                return s.post(agent.url + "/v1/stats", json=body(i, f"inst-{i % 4}"), headers=AUTH, timeout=30).status_code

        with ThreadPoolExecutor(max_workers=16) as pool:
            codes = list(pool.map(post, range(N_CONCURRENT)))
        assert codes == [201] * N_CONCURRENT
        m = requests.get(agent.url + "/v1/metrics").json()
        assert m["counters"]["reports_total"] == N_CONCURRENT
        assert m["measurement_window"]["sample_count"] == N_CONCURRENT
        assert m["measurement_window"]["instances"] == 4
        assert m["throughput"]["generated_tokens"] == sum(i % 7 + 1 for i in range(N_CONCURRENT))
        h = requests.get(agent.url + "/v1/history", params={"limit": 10_000}).json()
        assert h["count"] == N_CONCURRENT
        assert len({(it["stats"]["instance"], it["stats"]["request_id"]) for it in h["items"]}) == N_CONCURRENT


def test_restart_keeps_history_policy_version_and_window(tmp_path: Path) -> None:
    agent = BackgroundAgent(state_dir=tmp_path, token=TOKEN).start()
    try:
        for i in range(5):
            assert requests.post(agent.url + "/v1/stats", json=body(i), headers=AUTH).status_code == 201
        pol = requests.post(agent.url + "/v1/policy", json={"kv": {"recent_window": 96}}, headers=AUTH).json()
        requests.post(agent.url + "/v1/baseline", json={"enable": True}, headers=AUTH)
        requests.post(agent.url + "/v1/config", json={"window_seconds": 120}, headers=AUTH)
        before = requests.get(agent.url + "/v1/history").json()
    finally:
        agent.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(agent.url + "/v1/health", timeout=1)

    with BackgroundAgent(state_dir=tmp_path, token=TOKEN, port=agent.port) as again:
        after = requests.get(again.url + "/v1/history").json()
        assert after == before and after["count"] == 5
        view = requests.get(again.url + "/v1/policy").json()
        assert view["policy"]["kv"]["recent_window"] == 96
        assert view["baseline"] is True
        assert view["version"] == pol["version"] + 1  # the baseline switch came after the policy
        m = requests.get(again.url + "/v1/metrics").json()
        assert m["counters"]["reports_total"] == 5
        assert m["measurement_window"]["sample_count"] == 5  # the window is rebuilt from the store
        assert m["measurement_window"]["duration_seconds"] == 120.0
        # versions keep increasing across restarts
        v = requests.post(again.url + "/v1/baseline", json={"enable": False}, headers=AUTH).json()["version"]
        assert v == view["version"] + 1


def test_store_uses_wal_and_commits_before_returning(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path, max_rows=1000)
    assert store.journal_mode == "wal"
    row_id, dup = store.add_report({**body(1), "instance": "x"}, time.time())
    assert (row_id, dup) == (1, False)
    # another connection sees the row at once: it was committed
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT COUNT(*) FROM reports").fetchone()[0] == 1
    other.close()
    store.close()


def test_retention_by_row_count_keeps_newest_and_lifetime_counters(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path, max_rows=100)
    for i in range(250):
        store.add_report({**body(i), "dropped": 1 if i % 50 == 0 else 0}, time.time())
    assert store.count() == 100
    ids = [it["id"] for it in store.recent(1000)]
    assert ids == list(range(151, 251))
    assert store.counters() == {"reports_total": 250, "dropped_total": 5}
    store.close()


def test_dropped_counts_from_clients_show_in_metrics(tmp_path: Path) -> None:
    with BackgroundAgent(state_dir=tmp_path, token=TOKEN) as agent:
        requests.post(agent.url + "/v1/stats", json={**body(1), "dropped": 3}, headers=AUTH)
        requests.post(agent.url + "/v1/stats", json={**body(2), "dropped": 4}, headers=AUTH)
        m = requests.get(agent.url + "/v1/metrics").json()
    assert m["counters"]["dropped_reports_total"] == 7
    assert m["measurement_window"]["dropped_reports"] == 7
