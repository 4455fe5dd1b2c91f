"""The adaptive runtime: every row of the guide's §4.1 fallback table driven end to end in
virtual time, notifications and the critical state, provider failover within a request."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from lemonade_inferos.engine import Engine
from lemonade_inferos.engine.sampling import GenerationConfig
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.plugins import get_plugin_manager
from lemonade_inferos.policy import load_policy
from lemonade_inferos.resources import Telemetry
from lemonade_inferos.resources.budget import Estimate
from lemonade_inferos.resources.linux_drm import LinuxDrmBackend
from lemonade_inferos.resources.manager import ResourceManager, attach
from lemonade_inferos.runtime import AdaptiveRuntime, FallbackManager, Observation
from lemonade_inferos.runtime.backoff import Backoff

PROMPT = "Once upon a time, there was a little girl named Lily."


class VClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def write(p, text):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.fixture()
def rt(embedded_model, tmp_path):
    """An engine with a resource manager and runtime on a recorded sysfs tree (one NPU)."""
    clock = VClock()
    write(tmp_path / "sys/class/accel/accel0/device/uevent", "DRIVER=amdxdna\nPCI_ID=1022:17F0\n")
    write(tmp_path / "sys/class/accel/accel0/device/hwmon/hwmon0/temp1_input", "55000\n")
    write(tmp_path / "proc/meminfo", "MemTotal: 16000000 kB\nMemAvailable: 12000000 kB\n")
    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False), policy=load_policy("default"))
    rm = attach(eng, ResourceManager(10**7, timeout_s=0, clock=clock))
    state = {"providers": ["CPUExecutionProvider"], "dppl": None, "agent": True}

    class Agent:
        @property
        def agent_available(self):
            return state["agent"]

    runtime = AdaptiveRuntime(
        eng, Telemetry([LinuxDrmBackend(tmp_path)], root=tmp_path), clock=clock, wall=clock,
        providers=lambda: state["providers"], agent=Agent(),
        evaluate=lambda pol: None if state["dppl"] is None else {"delta_ppl": state["dppl"], "kld": 0.0})
    return eng, rm, runtime, clock, state, tmp_path


def _gen(eng, n=120):
    return eng.generate(PROMPT, GenerationConfig(max_new_tokens=n, stop_on_eos=False))


def test_backoff_grows_with_jitter_and_caps():
    b = Backoff(1.0, 10.0, 2.0, rng=lambda: 0.5)
    ds = [b.next_delay() for _ in range(6)]
    assert ds[0] == 1.0 and ds[1] == pytest.approx(2.0 * 1.2) and max(ds) <= 10.0 * 1.3
    assert all(b2 >= b1 for b1, b2 in zip(ds, ds[1:4]))
    b.reset()
    assert b.next_delay() == 1.0


def test_dml_missing_row(rt):
    eng, rm, runtime, clock, state, _ = rt
    pol = eng.policy  # wants prefill on dml
    state["providers"] = ["DmlExecutionProvider", "CPUExecutionProvider"]
    runtime.loops.tick()
    assert runtime.fallback.dml_seen and not runtime.fallback.rows["dml_missing"].active
    clock.t += 1
    state["providers"] = ["CPUExecutionProvider"]
    runtime.loops.tick()
    assert runtime.fallback.rows["dml_missing"].active
    applied = runtime.apply(pol)
    assert (applied.scheduler.prefill_device, applied.scheduler.decode_device) == ("cpu", "cpu")
    t = applied.kv.level_thresholds
    assert (t.L1_int8, t.L2_int4, t.L3_evict) == (0.2, 0.4, 0.6) and applied.kv.recent_window == 128
    r = _gen(eng)  # the request runs with the conservative policy (admission applies the table)
    assert r.stats.kv.level_distribution["L3"] <= _gen_ref(eng)
    state["providers"] = ["DmlExecutionProvider", "CPUExecutionProvider"]
    clock.t += 1
    runtime.loops.tick()
    clock.t += 299
    runtime.loops.tick()
    assert runtime.fallback.rows["dml_missing"].active  # 5 minutes not over yet
    clock.t += 2
    runtime.loops.tick()
    assert not runtime.fallback.rows["dml_missing"].active
    assert runtime.apply(pol) is pol
    kinds = [(e["kind"], e["reason"]) for e in runtime.fallback.events]
    assert ("fallback", "dml_missing") in kinds and ("notification", "dml_missing") in kinds
    assert ("recovered", "dml_missing") in kinds


def _gen_ref(eng):
    rm, eng.resources = eng.resources, None
    try:
        return _gen(eng).stats.kv.level_distribution["L3"]
    finally:
        eng.resources = rm


def test_npu_temperature_spike_moves_decode_and_recovers(rt):
    eng, rm, runtime, clock, state, root = rt
    temp = root / "sys/class/accel/accel0/device/hwmon/hwmon0/temp1_input"
    runtime.loops.tick()
    assert runtime.fallback.npu_seen and not runtime.fallback.rows["npu_unavailable"].active
    temp.write_text("97000\n")  # spike
    clock.t += 1
    runtime.loops.tick()
    row = runtime.fallback.rows["npu_unavailable"]
    assert row.active and "97.0" in row.detail
    applied = runtime.apply(eng.policy)
    assert applied.scheduler.decode_device == "dml"
    _gen(eng, 10)  # the request's session is chosen under decode_device=dml
    assert any(k[1][9] == "dml" for k in eng._sessions.keys())
    temp.write_text("60000\n")
    clock.t += 100
    runtime.loops.tick()
    assert row.active  # re-checked only every 5 minutes
    clock.t += 201
    runtime.loops.tick()
    assert not row.active and runtime.apply(eng.policy).scheduler.decode_device == "npu"


def test_quality_row_steps_back_int4_int8_fp16_and_recovers(rt):
    eng, rm, runtime, clock, state, _ = rt
    state["dppl"] = 0.9  # measured ΔPPL over quality.max_delta_ppl 0.5
    runtime.loops.tick()
    row = runtime.fallback.rows["quality"]
    assert row.active and row.level == 1
    r = _gen(eng, 300)
    assert r.stats.kv.level_distribution["L2"] == 0 and r.stats.kv.level_distribution["L3"] == 0
    assert r.stats.kv.level_distribution["L1"] > 0  # INT4 -> INT8
    clock.t += 1  # within backoff: no further step
    runtime.loops.tick()
    assert row.level == 1
    clock.t += 200
    runtime.loops.tick()
    assert row.level == 2
    r = _gen(eng, 50)
    assert r.stats.kv.store == "fp32"  # -> full precision (kv.mode disabled)
    state["dppl"] = 0.1
    clock.t += 200
    runtime.loops.tick()
    clock.t += 599
    runtime.loops.tick()
    assert row.active
    clock.t += 2
    runtime.loops.tick()
    assert not row.active
    assert runtime.loops.status()["quality"]["delta_ppl"] == 0.1


def test_memory_pressure_compresses_harder_evicts_sessions_and_recovers(rt):
    eng, rm, runtime, clock, state, _ = rt
    _gen(eng, 10)
    assert len(eng._sessions) == 1
    hold = rm.budget.reserve("hog", Estimate(int(9.5e6), int(9.5e6), 1, False), timeout_s=0)
    runtime.loops.tick()
    row = runtime.fallback.rows["memory_pressure"]
    assert row.active and len(eng._sessions) == 0  # idle session evicted
    applied = runtime.apply(eng.policy)
    assert applied.kv.recent_window == max(16, eng.policy.kv.recent_window // 2)
    assert applied.kv.level_thresholds.L3_evict < eng.policy.kv.level_thresholds.L3_evict
    hold.release()
    clock.t += 1
    runtime.loops.tick()
    assert not row.active


def test_agent_unreachable_row(rt):
    eng, rm, runtime, clock, state, _ = rt
    state["agent"] = False
    runtime.loops.tick()
    assert runtime.fallback.rows["agent_unreachable"].active
    state["agent"] = True
    clock.t += 1
    runtime.loops.tick()
    assert not runtime.fallback.rows["agent_unreachable"].active


def test_critical_after_too_many_fallbacks_and_notifications():
    clock = VClock()
    fb = FallbackManager(clock=clock, wall=clock)
    for i in range(5):
        clock.t += 10
        fb.device_error("DmlExecutionProvider", RuntimeError(f"boom {i}"))
    st = fb.status()
    assert st["critical"] and st["counters"]["device_error"] == 5
    assert st["notifications"]["device_error"] == 4  # from the 2nd trigger on (threshold 2)
    assert any(e["kind"] == "critical" for e in st["events"])
    fb.recover("device_error", "ok")
    assert not fb.critical


class FlakyDml:
    """A real CPU session that claims to be DirectML and fails its 5th run (as a removed
    device would: DXGI_ERROR_DEVICE_REMOVED)."""

    def __init__(self, real, fail_at=5):
        self._real, self._n, self._fail_at = real, 0, fail_at

    def get_providers(self):
        return ["DmlExecutionProvider", "CPUExecutionProvider"]

    def _count(self):
        self._n += 1
        if self._n == self._fail_at:
            raise RuntimeError("DmlExecutionProvider: DXGI_ERROR_DEVICE_REMOVED (0x887A0005)")

    def run_with_iobinding(self, io, ro=None):
        self._count()
        return self._real.run_with_iobinding(io, ro)

    def run(self, *a, **k):
        self._count()
        return self._real.run(*a, **k)

    def __getattr__(self, name):
        return getattr(self._real, name)


class WantsDml:
    @hookimpl(tryfirst=True)
    def execution_providers(self, policy, available):
        return [("DmlExecutionProvider", {"device_id": 0}), ("CPUExecutionProvider", {})]


def _dml_engine(model, factory):
    pm = get_plugin_manager(entry_points=False, extra=[("test.dml", WantsDml())])
    eng = Engine(model, pm=pm, policy=load_policy("default"))
    eng.failover.factory = factory
    return eng


def test_provider_failing_during_run_continues_on_cpu_in_same_request(embedded_model):
    def factory(path, sess_options=None, providers=(), provider_options=()):
        real = ort.InferenceSession(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        return FlakyDml(real) if providers[0] == "DmlExecutionProvider" else real

    eng = _dml_engine(embedded_model, factory)
    fb = FallbackManager()
    eng.failover.fallback = fb
    ref = Engine(embedded_model, pm=get_plugin_manager(entry_points=False), policy=load_policy("default"))
    want = ref.generate(PROMPT, GenerationConfig(max_new_tokens=40))
    got = eng.generate(PROMPT, GenerationConfig(max_new_tokens=40))
    assert got.token_ids == want.token_ids  # same request completed, same tokens
    assert got.stats.provider == "CPUExecutionProvider"
    assert any("DmlExecutionProvider failed during the run" in n for n in got.stats.notes)
    assert eng.failover.failures["DmlExecutionProvider"] == 1 and fb.counters["device_error"] == 1
    assert eng.failover.excluded() == ("DmlExecutionProvider",)


def test_provider_failing_to_create_session_falls_back(embedded_model):
    calls = []

    def factory(path, sess_options=None, providers=(), provider_options=()):
        calls.append(list(providers))
        if providers[0] == "DmlExecutionProvider":
            raise RuntimeError("D3D12 device creation failed")
        return ort.InferenceSession(path, sess_options=sess_options, providers=list(providers))

    eng = _dml_engine(embedded_model, factory)
    r = eng.generate(PROMPT, GenerationConfig(max_new_tokens=8))
    assert len(r.token_ids) == 8 and r.stats.provider == "CPUExecutionProvider"
    assert calls[0][0] == "DmlExecutionProvider" and calls[1] == ["CPUExecutionProvider"]
    assert eng.failover.status()["retries"] == 1


def test_cpu_failure_is_not_hidden(embedded_model):
    def factory(path, sess_options=None, providers=(), provider_options=()):
        raise RuntimeError("out of memory")

    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False))
    eng.failover.factory = factory
    with pytest.raises(RuntimeError, match="out of memory"):
        eng.generate(PROMPT, GenerationConfig(max_new_tokens=4))


def test_loops_periods_come_from_the_policy(rt):
    eng, rm, runtime, clock, state, _ = rt
    eng.policy = eng.policy.merged({"loops": {"fast_ms": 1, "mid_ms": 2000, "slow_ms": 10000}})
    state["dppl"] = 0.1
    assert runtime.loops.tick() == ["mid", "slow"]
    clock.t += 1.0
    assert runtime.loops.tick() == []
    clock.t += 1.0
    assert runtime.loops.tick() == ["mid"]
    clock.t += 8.0
    assert runtime.loops.tick() == ["mid", "slow"]


def test_slow_loop_measures_quality_through_the_cached_path(embedded_model):
    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False), policy=load_policy("default"))
    runtime = AdaptiveRuntime(eng, Telemetry([], root="/nonexistent"), providers=lambda: ["CPUExecutionProvider"])
    assert runtime.loops.tick() == ["mid", "slow"]
    q = runtime.loops.status()["quality"]
    assert q["tokens"] == 256 and 0 <= q["kld"] < 0.1 and abs(q["delta_ppl"]) < 0.5
    assert not runtime.fallback.rows["quality"].active  # within quality.max_delta_ppl


def test_serve_wiring_attaches_budget_pool_quotas_and_runtime(embedded_model, tmp_path, monkeypatch):
    import argparse

    from lemonade_inferos.kv.store import set_buffer_allocator
    from lemonade_inferos.resources.manager import attach_from_args

    monkeypatch.setenv("INFEROS_STATE_DIR", str(tmp_path / "state"))
    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False), policy=load_policy("default"))
    args = argparse.Namespace(kv_budget="4MiB", admission_timeout=5.0, no_runtime=False)
    rm = attach_from_args(eng, args)
    try:
        assert eng.resources is rm and rm.budget.total_bytes == 4 * 2**20 and rm.quotas is not None
        assert rm.pool is not None and rm.runtime.loops._thread.is_alive()
        r = eng.generate(PROMPT, GenerationConfig(max_new_tokens=20))
        assert r.stats.resources["kv_budget"]["total_bytes"] == 4 * 2**20
        assert "fallback" in r.stats.resources["runtime"]
        assert (tmp_path / "state" / "history.sqlite3").is_file()
        with pytest.raises(ValueError, match="--kv-budget"):
            attach_from_args(eng, argparse.Namespace(kv_budget="lots", admission_timeout=5.0, no_runtime=True))
    finally:
        rm.runtime.loops.stop()
        set_buffer_allocator(None)


def test_dml_never_seen_counts_where_it_is_expected():
    from lemonade_inferos.runtime.fallback import Settings

    pol = load_policy("default")  # prefill on dml
    clock = VClock()
    linux = FallbackManager(Settings(expect_dml=False), clock=clock)
    linux.observe(Observation(providers=["CPUExecutionProvider"]), pol)
    assert not linux.rows["dml_missing"].active  # a CPU-only build: nothing was lost
    win = FallbackManager(Settings(expect_dml=True), clock=clock)
    win.observe(Observation(providers=["CPUExecutionProvider"]), pol)
    assert win.rows["dml_missing"].active


def test_provider_failing_mid_chunked_prefill_resumes_on_cpu(embedded_model):
    def factory(path, sess_options=None, providers=(), provider_options=()):
        real = ort.InferenceSession(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        return FlakyDml(real, fail_at=2) if providers[0] == "DmlExecutionProvider" else real

    pol = load_policy("default").merged({"runtime": {"prefill_chunk_tokens": 32}})
    eng = _dml_engine(embedded_model, factory)
    ref = Engine(embedded_model, pm=get_plugin_manager(entry_points=False), policy=pol)
    prompt = ref.encode(PROMPT * 4)[:100]  # 4 prefill chunks; the 2nd fails
    want = ref.generate(prompt, GenerationConfig(max_new_tokens=20), policy=pol)
    got = eng.generate(prompt, GenerationConfig(max_new_tokens=20), policy=pol)
    assert got.token_ids == want.token_ids and got.stats.provider == "CPUExecutionProvider"
    assert got.stats.prompt_nll == pytest.approx(want.stats.prompt_nll, rel=1e-4)
    assert eng.failover.failures["DmlExecutionProvider"] == 1
