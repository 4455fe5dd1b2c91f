"""KV budget, admission, quotas, LRU and the host pool -- on real engines and real stores."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from lemonade_inferos.engine import Engine
from lemonade_inferos.engine.sampling import GenerationConfig
from lemonade_inferos.plugins import get_plugin_manager
from lemonade_inferos.policy import load_policy
from lemonade_inferos.resources.budget import BudgetExceeded, Estimate, KVBudget, kv_bytes_estimate
from lemonade_inferos.resources.lru import LRUCache
from lemonade_inferos.resources.manager import ResourceManager, budget_from_policy
from lemonade_inferos.resources.pool import HostPool, memlock_limit
from lemonade_inferos.resources.quotas import QuotaStore, client_id
from lemonade_inferos.types import InferenceContext

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside."


def _engine(model, rm=None):
    return Engine(model, pm=get_plugin_manager(entry_points=False), policy=load_policy("default"), resources=rm)


def test_estimate_bounds_real_store_usage(embedded_model):
    eng = _engine(embedded_model)
    pol = load_policy("default")
    for max_new in (16, 200, 400):
        res = eng.generate(PROMPT, GenerationConfig(max_new_tokens=max_new, stop_on_eos=False), policy=pol)
        est = kv_bytes_estimate(eng.spec, pol, len(res.prompt_ids) + max_new)
        assert res.stats.kv.total_bytes <= est.want, (max_new, res.stats.kv.total_bytes, est)
        assert est.floor <= est.want and est.tightenable
    # a prompt prefilled in one run sits at float16 until re-tiered: the floor covers it
    row = int(eng.spec.kv_bytes_per_token(2))
    est = kv_bytes_estimate(eng.spec, pol, 500, prompt_tokens=400)
    assert est.floor >= 400 * row and est.want >= 400 * row
    full = kv_bytes_estimate(eng.spec, pol.merged({"kv": {"mode": "disabled"}}), 100)
    assert full.want == full.floor == eng.spec.kv_bytes_per_token(4) * 100 and not full.tightenable


def test_ledger_fits_tightens_waits_refuses():
    clock = [0.0]
    b = KVBudget(1000, clock=lambda: clock[0])
    r1 = b.reserve("a", Estimate(600, 200, 10, True), timeout_s=0)
    r2 = b.reserve("b", Estimate(600, 200, 10, True), timeout_s=0)  # tightened to the 400 left
    assert (r1.granted, r2.granted, r2.tightened) == (600, 400, True)
    with pytest.raises(BudgetExceeded) as e:
        b.reserve("c", Estimate(300, 300, 10, False), timeout_s=0)
    assert e.value.status == 503 and "KV budget full" in str(e.value)
    with pytest.raises(BudgetExceeded, match="whole KV budget"):
        b.reserve("d", Estimate(2000, 1500, 10, True), timeout_s=10)
    got = []
    t = threading.Thread(target=lambda: got.append(b.reserve("e", Estimate(500, 500, 10, False), timeout_s=None)))
    t.start()
    time.sleep(0.05)
    assert not got and b.status()["requests_queued"] == 1
    r1.release()
    t.join(5)
    assert got and got[0].granted == 500 and b.reserved_bytes == 900
    assert b.counters["waited"] == 1 and b.counters["refused"] == 2


def test_concurrent_long_requests_never_exceed_budget(embedded_model):
    eng = _engine(embedded_model)
    pol = load_policy("default")
    est = kv_bytes_estimate(eng.spec, pol, 411, prompt_tokens=111)
    total = int(est.want * 2.5)  # room for ~2 at full estimate; 6 requests compete
    rm = ResourceManager(total, timeout_s=60)
    eng = _engine(embedded_model, rm)
    ok, refused, errors = [], [], []
    peak = {"used": 0, "reserved": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            st = rm.budget.status()
            peak["used"] = max(peak["used"], st["used_bytes"])
            peak["reserved"] = max(peak["reserved"], st["reserved_bytes"])
            assert st["used_bytes"] <= total
            for r in rm.budget.active():  # each request within its own grant, prefill included
                used = r.used_bytes
                peak["over_grant"] = max(peak.get("over_grant", 0), used - r.granted)
            time.sleep(0.001)

    def one(i):
        try:
            r = eng.generate(PROMPT * 4, GenerationConfig(max_new_tokens=300, stop_on_eos=False, seed=i))
            ok.append(r)
        except BudgetExceeded as e:
            refused.append(e)
        except Exception as e:  # pragma: no cover - the test fails below
            errors.append(e)

    w = threading.Thread(target=watch)
    w.start()
    ts = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    stop.set()
    w.join()
    assert not errors
    assert len(ok) + len(refused) == 6 and ok
    assert peak["reserved"] <= total and rm.budget.peak_reserved <= total
    assert peak["used"] <= total and peak["used"] > 0
    assert peak["over_grant"] <= 0, peak
    for r in ok:
        assert len(r.token_ids) == 300  # nothing lost: every admitted request completed
        assert any("KV budget: reserved" in n for n in r.stats.notes)
    assert rm.budget.reserved_bytes == 0 and rm.budget.status()["requests_running"] == 0


def test_tightened_request_stays_within_its_grant(embedded_model):
    pol = load_policy("default")
    eng = _engine(embedded_model)
    est = kv_bytes_estimate(eng.spec, pol, 500)
    grant = (est.want + est.floor) // 2
    rm = ResourceManager(grant, timeout_s=0)
    eng = _engine(embedded_model, rm)
    r = eng.generate(PROMPT, GenerationConfig(max_new_tokens=480, stop_on_eos=False))
    assert any("tightened" in n for n in r.stats.notes)
    assert r.stats.kv.total_bytes <= grant
    assert r.stats.kv.level_distribution["L3"] + r.stats.kv.level_distribution["L2"] > 0


def test_refusal_is_clear_when_it_can_never_fit(embedded_model):
    rm = ResourceManager(1000, timeout_s=0)
    eng = _engine(embedded_model, rm)
    with pytest.raises(BudgetExceeded, match="whole KV budget is 1000 bytes"):
        eng.generate(PROMPT, GenerationConfig(max_new_tokens=50))


def test_budget_from_policy_is_memory_aware():
    pol = load_policy("default")
    total, how = budget_from_policy(pol, available_bytes=1 << 30)
    assert total == 1 << 29 and "available host memory" in how
    total, how = budget_from_policy(pol, available_bytes=1 << 40)
    assert total == pol.io.host_pool_bytes
    dml = pol.merged({"scheduler": {"decode_device": "dml"}, "io": {"dml_pool_bytes": "1GiB"}})
    assert budget_from_policy(dml, available_bytes=1 << 40) == (1 << 30, "io.dml_pool_bytes=1073741824 (decode on DirectML)")


def test_client_quotas_and_persistence(tmp_path, embedded_model):
    qs = QuotaStore(tmp_path / "history.sqlite3")
    qs.set("alice", None, 1)
    rm = ResourceManager(10**9, quotas=qs, timeout_s=0)
    eng = _engine(embedded_model)
    ctx = InferenceContext(model="m", prompt_tokens=10, max_new_tokens=10, extra={"client": "alice"})
    a1 = rm.admit(ctx, load_policy("default"), eng.spec)
    with pytest.raises(BudgetExceeded) as e:
        rm.admit(InferenceContext(model="m", prompt_tokens=10, max_new_tokens=10, extra={"client": "alice"}),
                 load_policy("default"), eng.spec)
    assert e.value.status == 429 and "alice" in str(e.value)
    rm.admit(InferenceContext(model="m", prompt_tokens=10, max_new_tokens=10, extra={"client": "bob"}),
             load_policy("default"), eng.spec).release()
    a1.release()
    qs.close()
    qs2 = QuotaStore(tmp_path / "history.sqlite3")  # a restart reads what was stored
    v = {c["client"]: c for c in qs2.view()["clients"]}
    assert v["alice"]["max_concurrent"] == 1 and v["alice"]["requests"] == 1 and v["alice"]["refused"] == 1
    assert v["bob"]["requests"] == 1 and v["bob"]["max_concurrent"] is None
    assert client_id("team-a") == "team-a" and client_id(None, "sk-secret").startswith("key:")
    assert "sk-secret" not in client_id(None, "sk-secret") and client_id() == "default"
    with pytest.raises(ValueError, match="X-Inferos-Client"):
        client_id("bad id with spaces")


def test_session_cache_is_bounded_lru():
    clock = [0.0]
    c = LRUCache(2, clock=lambda: clock[0])
    c["a"], c["b"] = 1, 2
    c.get("a")
    assert c.put("c", 3) == ["b"] and c.keys() == ["a", "c"]
    clock[0] = 100
    c.get("c")
    assert c.evict_idle(idle_s=50) == ["a"] and len(c) == 1
    assert c == {"c": 3} and dict(c) == {"c": 3}  # a mapping: compares and copies like a dict
    del c["c"]
    assert len(c) == 0


def test_engine_sessions_bounded(embedded_model):
    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False), max_sessions=2)
    base = load_policy("default").merged({"kv": {"mode": "disabled"}})
    for n in (1, 2, 3):
        eng.session("model.onnx", base.merged({"runtime": {"intra_op_threads": n}}))
    assert len(eng._sessions) == 2


def test_host_pool_alloc_free_coalesce_and_status():
    p = HostPool(64 * 4096, lock=True)
    st = p.status()
    lim = memlock_limit()
    if lim is not None and lim < p.total_bytes:
        assert not st.locked and "RLIMIT_MEMLOCK" in st.note
    a, b, c = p.alloc(4096), p.alloc(8192), p.alloc(4096)
    assert (a, b, c) == (0, 4096, 12288)
    p.free(b)
    st = p.status()
    assert (st.block_count, st.used_bytes, st.free_bytes) == (2, 8192, 64 * 4096 - 8192)
    assert 0 < st.fragmentation < 1 and st.largest_free_bytes == 64 * 4096 - 16384
    p.free(a)
    p.free(c)
    st = p.status()
    assert st.fragmentation == 0 and st.largest_free_bytes == p.total_bytes
    arr = p.zeros((100, 10), np.float16)
    assert arr.shape == (100, 10) and not arr.any() and p.status().block_count == 1
    del arr
    gc.collect()
    assert p.status().block_count == 0
    big = p.zeros(10**7, np.uint8)  # larger than the pool: ordinary memory, counted
    assert big.size == 10**7 and p.overflow == 1
    with pytest.raises(KeyError):
        p.free(12345)


def test_store_buffers_come_from_the_pool(embedded_model):
    from lemonade_inferos.kv.store import set_buffer_allocator

    rm = ResourceManager(1 << 22, timeout_s=0)
    pool = HostPool(1 << 22)
    rm.pool = pool
    seen = []
    real = pool.zeros

    def zeros(shape, dtype):
        a = real(shape, dtype)
        seen.append(pool.status().block_count)
        return a

    set_buffer_allocator(zeros)
    try:
        eng = _engine(embedded_model, rm)
        r = eng.generate(PROMPT, GenerationConfig(max_new_tokens=100, stop_on_eos=False))
    finally:
        set_buffer_allocator(None)
    assert len(r.token_ids) == 100 and seen and max(seen) >= 1 and pool.overflow == 0
    assert rm.status()["memory_pool"]["total_bytes"] == pool.total_bytes
    gc.collect()
    assert pool.status().used_bytes < pool.total_bytes


@pytest.mark.parametrize("chunk", [512, 64])
def test_grant_covers_the_prefill_retiering_peak(embedded_model, monkeypatch, chunk):
    """The store's accounting peaks inside a prefill chunk's re-tiering (the chunk's rows
    still at float16 while the new quantized tiers exist); the reservation covers it, for a
    one-run prefill and a chunked one."""
    from lemonade_inferos.kv.store import TieredKVCache

    peaks = []
    real = TieredKVCache._apply

    def apply(self, target):
        rows_before = self._n0
        real(self, target)
        peaks.append(rows_before * self.row_bytes + sum(t.nbytes() for t in self._tiers.values()))

    monkeypatch.setattr(TieredKVCache, "_apply", apply)
    rm = ResourceManager(10**8, timeout_s=0)
    eng = _engine(embedded_model, rm)
    eng.policy = eng.policy.merged({"runtime": {"prefill_chunk_tokens": chunk}})
    prompt = eng.encode(PROMPT * 14)[:420]
    grants = []
    real_admit = rm.admit
    monkeypatch.setattr(rm, "admit", lambda *a, **k: grants.append(real_admit(*a, **k)) or grants[-1])
    eng.generate(prompt, GenerationConfig(max_new_tokens=8, stop_on_eos=False))
    granted = grants[0].reservation.granted
    assert peaks and max(peaks) <= granted, (max(peaks), granted)
    if chunk == 64:  # chunking lowers the reservation (a whole-prompt transient would be larger)
        whole = kv_bytes_estimate(eng.spec, eng.policy, 428, prompt_tokens=420, chunk_tokens=420)
        assert granted < whole.want
