"""The sliding metrics window (pure): hand-computed expectations for every definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lemonade_inferos.agent.metrics import MetricsWindow, Report, finite, percentile, window_sections
from lemonade_inferos.types import KVStats, RunStats

NOW = 1_800_000_000.0


def report(i: int, *, start: float, end: float, tokens: int = 10, ttft: float | None = 20.0, total_ms: float | None = None,
           nll: float | None = None, prompt: int = 8, baseline: bool = False, kv_bytes: int = 0, fp16: int = 0,
           levels: dict[str, int] | None = None, rss: int = 0, instance: str = "a", received: float | None = None,
           store: str = "tiered", dropped: int = 0, prompt_hash: str = "aa") -> Report:
    stats = RunStats(
        request_id=f"r{i}", start_time=start, end_time=end, prompt_tokens=prompt, generated_tokens=tokens, ttft_ms=ttft,
        total_ms=(end - start) * 1000 if total_ms is None else total_ms, prompt_nll=nll, baseline=baseline,
        prompt_hash=prompt_hash,
        peak_rss_bytes=rss, kv=KVStats(total_bytes=kv_bytes, fp16_bytes=fp16, level_distribution=levels or {}, store=store),
    )
    return Report.from_payload({**stats.to_dict(), "instance": instance, "dropped": dropped}, id=i,
                               received_at=NOW if received is None else received)


def sections(reports: list[Report], window: float = 60.0, now: float = NOW) -> dict:
    w = MetricsWindow(window)
    for r in reports:
        w.add(r)
    return window_sections(w.in_window(now), now, window, w.baseline_reference())


def test_percentile_matches_numpy_linear() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101):
        xs = sorted(rng.uniform(0, 1000, n).tolist())
        for q in (0, 50, 95, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert percentile([], 50) is None


def test_throughput_is_tokens_over_window_wall_time() -> None:
    # Three requests; the first started 30 s ago, so the wall time is 30 s (not the 60 s window).
    rs = [report(1, start=NOW - 30, end=NOW - 29, tokens=100), report(2, start=NOW - 10, end=NOW - 9, tokens=50),
          report(3, start=NOW - 2, end=NOW - 1, tokens=30)]
    tp = sections(rs)["throughput"]
    assert tp["generated_tokens"] == 180
    assert tp["wall_seconds"] == 30.0
    assert tp["tokens_per_second"] == 6.0
    assert tp["requests_per_second"] == 0.1


def test_window_excludes_old_reports_and_caps_wall_time() -> None:
    rs = [report(1, start=NOW - 100, end=NOW - 61, tokens=1000),  # ended before the window
          report(2, start=NOW - 70, end=NOW - 50, tokens=120)]    # started before it: wall = 60 s
    s = sections(rs)
    assert s["measurement_window"]["sample_count"] == 1
    assert s["throughput"]["tokens_per_second"] == 2.0
    assert s["throughput"]["wall_seconds"] == 60.0


def test_future_end_time_is_clamped_to_receipt() -> None:
    r = report(1, start=NOW - 1, end=NOW + 500, received=NOW - 0.5)
    assert r.t == NOW - 0.5
    assert sections([r])["measurement_window"]["sample_count"] == 1


def test_latency_and_ttft_statistics() -> None:
    totals = [100.0, 200.0, 300.0, 400.0, 1000.0]
    ttfts = [10.0, 20.0, None, 40.0, 50.0]
    rs = [report(i, start=NOW - 10 + i, end=NOW - 9 + i, total_ms=t, ttft=f) for i, (t, f) in enumerate(zip(totals, ttfts))]
    s = sections(rs)
    lat, ftl = s["latency"], s["first_token_latency"]
    assert lat["mean_ms"] == 400.0
    assert lat["median_ms"] == 300.0
    assert lat["p95_ms"] == pytest.approx(np.percentile(totals, 95))
    assert lat["p99_ms"] == pytest.approx(np.percentile(totals, 99))
    assert lat["std_ms"] == pytest.approx(float(np.std(totals)), abs=1e-3)
    # TTFT: only the measured ones (None is left out, never estimated)
    assert ftl["samples"] == 4
    assert ftl["mean_ms"] == 30.0
    assert ftl["median_ms"] == 30.0
    assert ftl["p95_ms"] == pytest.approx(np.percentile([10, 20, 40, 50], 95))


def test_no_ttft_means_null_not_estimate() -> None:
    s = sections([report(1, start=NOW - 2, end=NOW - 1, ttft=None)])
    assert s["first_token_latency"]["mean_ms"] is None
    assert s["first_token_latency"]["samples"] == 0


def test_delta_ppl_is_token_weighted_ppl_difference_vs_baseline_on_the_same_prompts() -> None:
    rs = [
        report(1, start=NOW - 5, end=NOW - 4, nll=2.0, prompt=10, prompt_hash="a1"),
        report(2, start=NOW - 4.5, end=NOW - 4, nll=2.5, prompt=30, prompt_hash="b2"),
        report(3, start=NOW - 4, end=NOW - 3, nll=3.0, prompt=30, prompt_hash="c3"),  # no baseline run: left out
        report(4, start=NOW - 3, end=NOW - 2, nll=1.5, prompt=10, baseline=True, prompt_hash="a1"),
        report(5, start=NOW - 3, end=NOW - 2, nll=2.25, prompt=30, baseline=True, prompt_hash="b2"),
        report(6, start=NOW - 3, end=NOW - 2, nll=9.0, prompt=20, baseline=True, prompt_hash="d4"),  # left out
    ]
    d = sections(rs)["quality"]["delta_ppl_est"]
    cur = math.exp((2.0 * 10 + 2.5 * 30) / 40)
    base = math.exp((1.5 * 10 + 2.25 * 30) / 40)
    assert d["current"] == round(cur, 4)
    assert d["baseline"] == round(base, 4)
    assert d["delta"] == round(cur - base, 4)
    assert d["measurement"]["baseline_source"] == "window" and d["measurement"]["paired_prompts"] == 2


def test_delta_ppl_never_compares_different_prompts() -> None:
    """A hard story run with the policy and an easy one in baseline mode is not a ΔPPL of +5000."""
    rs = [report(1, start=NOW - 5, end=NOW - 4, nll=9.0, prompt_hash="hard"),
          report(2, start=NOW - 3, end=NOW - 2, nll=1.0, baseline=True, prompt_hash="easy")]
    d = sections(rs)["quality"]["delta_ppl_est"]
    assert d["delta"] is None and d["measurement"]["paired_prompts"] == 0
    assert d["measurement"]["baseline_source"].startswith("none")


def test_delta_ppl_null_without_baseline_and_uses_older_reference() -> None:
    only_policy = [report(1, start=NOW - 5, end=NOW - 4, nll=2.0)]
    assert sections(only_policy)["quality"]["delta_ppl_est"]["delta"] is None
    # a baseline report that ended long before the window still serves as the reference
    old_base = report(0, start=NOW - 500, end=NOW - 499, nll=1.0, baseline=True)
    d = sections([old_base, *only_policy])["quality"]["delta_ppl_est"]
    assert d["baseline"] == round(math.e, 4)
    assert d["delta"] == round(math.exp(2.0) - math.e, 4)
    assert d["measurement"]["baseline_source"] == "recent baseline-mode reports"


def test_memory_definitions() -> None:
    rs = [
        report(1, start=NOW - 5, end=NOW - 4, kv_bytes=2_000_000, rss=300_000_000, instance="a"),
        report(2, start=NOW - 4, end=NOW - 3, kv_bytes=1_000_000, rss=500_000_000, instance="b"),
        report(3, start=NOW - 3, end=NOW - 2, kv_bytes=1_500_000, rss=350_000_000, instance="a"),
    ]
    m = sections(rs)["memory"]
    assert m["kv_cache_usage_mb"] == 1.5     # newest report
    assert m["kv_cache_peak_mb"] == 2.0
    assert m["kv_cache_mean_mb"] == 1.5
    assert m["total_allocated_mb"] == 850.0  # a's newest 350 MB + b's 500 MB
    assert m["peak_usage_mb"] == 500.0
    assert "peak_rss_bytes" in m["definitions"]["total_allocated_mb"]


def test_kv_stats_exclude_baseline_reports() -> None:
    rs = [
        report(1, start=NOW - 5, end=NOW - 4, kv_bytes=300, fp16=1000, levels={"L0": 10, "L2": 30}),
        report(2, start=NOW - 4, end=NOW - 3, kv_bytes=200, fp16=1000, levels={"L0": 10, "L3": 10}),
        report(3, start=NOW - 3, end=NOW - 2, kv_bytes=2000, fp16=1000, levels={"L0": 99}, baseline=True, store="fp32"),
    ]
    kv = sections(rs)["kv_stats"]
    assert kv["level_distribution"] == {"L0": 20, "L2": 30, "L3": 10}
    assert kv["compression_ratio"] == 0.25
    assert kv["compression_vs_fp16"] == 4.0
    assert kv["samples"] == 2


def test_empty_window() -> None:
    s = sections([])
    assert s["throughput"]["tokens_per_second"] == 0.0
    assert s["latency"]["mean_ms"] is None
    assert s["memory"]["kv_cache_usage_mb"] is None
    assert s["kv_stats"]["compression_ratio"] is None


def test_prune_and_finite() -> None:
    w = MetricsWindow(10)
    w.add(report(1, start=NOW - 30, end=NOW - 20))
    w.add(report(2, start=NOW - 3, end=NOW - 2))
    w.prune(NOW)
    assert [r.id for r in w.in_window(NOW)] == [2]
    assert finite({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0], "b": None}


def test_reports_under_the_baseline_policy_count_as_baseline() -> None:
    r = report(1, start=NOW - 2, end=NOW - 1, nll=1.0)
    payload = {"start_time": NOW - 2, "end_time": NOW - 1, "policy_name": "baseline", "instance": "a"}
    assert not r.baseline
    assert Report.from_payload(payload, id=2, received_at=NOW).baseline
