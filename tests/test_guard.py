"""Quality guard: ladder, budget decisions on real measurements, caching, engine wiring."""

from __future__ import annotations


from lemonade_inferos.engine import Engine, GenerationConfig
from lemonade_inferos.guard import QualityGuard, ladder
from lemonade_inferos.plugins import get_plugin_manager
from lemonade_inferos.policy import load_policy


def test_ladder_steps_towards_less_compression():
    rungs = ladder(load_policy("13b"))
    assert [r.kv.mode for r in rungs] == ["dynamic", "dynamic", "quality_optimized", "disabled"]
    assert rungs[1].kv.level_thresholds.L3_evict == 1.0
    assert ladder(load_policy("quality"))[-1].kv.mode == "disabled"
    assert len(ladder(load_policy("default").merged({"kv": {"mode": "disabled"}}))) == 1


def test_decisions_follow_measurements_and_are_cached():
    calls = []

    def measure(pol):  # a fake quality model: eviction costs 0.3 PPL, INT4 0.05
        calls.append(pol.name)
        evict = pol.kv.level_thresholds.L3_evict < 1.0 and pol.kv.mode != "quality_optimized"
        return {"delta_ppl": 0.3 if evict else 0.05 if pol.kv.mode != "quality_optimized" else 0.0, "kld_mean": 0.001}

    g = QualityGuard(measure, key="m")
    pol = load_policy("13b")
    assert g.decide(pol, 0.5).stepped_back == 0
    d = g.decide(pol, 0.1)
    assert d.stepped_back == 1 and d.policy.kv.level_thresholds.L3_evict == 1.0
    assert "stepped back 1" in d.note()
    assert g.decide(pol, 0.01).policy.kv.mode == "quality_optimized"
    n = len(calls)
    g.decide(pol, 0.1)
    assert len(calls) == n  # cached


def test_guard_in_the_engine_measures_for_real(embedded_model):
    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False))
    strict = load_policy("13b").merged({"quality": {"guard": True, "max_delta_ppl": 0.0, "max_kld": 0.0}})
    res = eng.generate("Once upon a time", GenerationConfig(max_new_tokens=20), policy=strict)
    # nothing lossy can meet a zero budget: the guard must fall through to the disabled store
    assert res.policy.kv.mode == "disabled"
    assert any("stepped back" in n for n in res.stats.notes)
    decision = eng.quality_guard().decide(strict)
    assert decision.measurements and all(m["delta_ppl"] > 0 or m["kld_mean"] > 0 for m in decision.measurements)
    lenient = load_policy("default").merged({"quality": {"guard": True, "max_delta_ppl": 2.0, "max_kld": 1.0}})
    res = eng.generate("Once upon a time", GenerationConfig(max_new_tokens=20), policy=lenient)
    assert res.policy.name == lenient.name
    assert any("within budget" in n for n in res.stats.notes)
    assert len(eng.calibration_ids()) == eng.spec.context_length
