"""Quality guard: measure a KV policy's quality cost and step compression back when it is
over budget.

The cost is measured, not estimated: the guard runs the cached-path protocol of
:mod:`lemonade_inferos.quality` (ΔPPL and mean KL divergence against the full-precision
cache) on a calibration text, and walks a fixed ladder of less aggressive KV settings until
both are within budget:

1. the policy as given;
2. no eviction (``L3_evict = 1.0``);
3. INT8 only (``mode = quality_optimized``);
4. KV store disabled (float16/float32, no quantization).

Budgets: ``quality.max_delta_ppl`` (absolute perplexity increase; the request's
``quality_budget`` overrides it) and ``quality.max_kld`` (mean nats/token).

Results are cached per (model folder, KV section of the policy, budgets), so the
calibration runs once per setting, not per request. The calibration text is the model's own
sample (temperature 1.0, fixed seed, one context length long), which is in-distribution for
any model without shipping data.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .policy import Policy

log = logging.getLogger("lemonade_inferos.guard")


def ladder(policy: Policy) -> list[Policy]:
    """The policy followed by progressively less compressing variants (see module doc)."""
    steps = [policy]
    if policy.kv.mode == "disabled":
        return steps
    if policy.kv.level_thresholds.L3_evict < 1.0 and policy.kv.mode != "quality_optimized":
        steps.append(policy.merged({"kv": {"level_thresholds": {"L3_evict": 1.0}}}, name=f"{policy.name}+no-evict"))
    if policy.kv.mode != "quality_optimized":
        steps.append(policy.merged({"kv": {"mode": "quality_optimized"}}, name=f"{policy.name}+int8"))
    steps.append(policy.merged({"kv": {"mode": "disabled"}}, name=f"{policy.name}+kv-off"))
    return steps


@dataclass
class GuardDecision:
    """What the guard chose for one KV setting, with every measurement it made."""

    policy: Policy
    stepped_back: int
    measurements: list[dict[str, Any]] = field(default_factory=list)

    def note(self) -> str:
        m = self.measurements[-1] if self.measurements else {}
        if not self.stepped_back:
            return f"quality guard: {self.policy.name} within budget (ΔPPL {m.get('delta_ppl', 0):+.4f}, KLD {m.get('kld_mean', 0):.4f})"
        first = self.measurements[0]
        return (
            f"quality guard: stepped back {self.stepped_back} level(s) to {self.policy.name} "
            f"(first ΔPPL {first['delta_ppl']:+.4f}, KLD {first['kld_mean']:.4f} over budget)"
        )


class QualityGuard:
    """Chooses, per KV setting, the most compressing rung of :func:`ladder` within budget.

    Args:
        measure: ``measure(policy) -> {"delta_ppl": float, "kld_mean": float, ...}``; the
            engine passes a function running :func:`lemonade_inferos.quality.evaluate_ids`
            on its calibration text.
        key: a string identifying the model (folder path), part of the cache key.
    """

    def __init__(self, measure: Callable[[Policy], dict[str, Any]], key: str = ""):
        self._measure = measure
        self._key = key
        self._cache: dict[str, GuardDecision] = {}
        self._lock = threading.Lock()

    def decide(self, policy: Policy, max_delta_ppl: float | None = None) -> GuardDecision:
        """The decision for ``policy`` (cached). ``max_delta_ppl`` overrides the policy's."""
        budget = policy.quality.max_delta_ppl if max_delta_ppl is None else max_delta_ppl
        max_kld = policy.quality.max_kld
        key = json.dumps([self._key, policy.kv.model_dump(mode="json"), budget, max_kld], sort_keys=True)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            measurements: list[dict[str, Any]] = []
            rungs = ladder(policy)
            chosen, level = rungs[-1], len(rungs) - 1
            for i, rung in enumerate(rungs):
                if rung.kv.mode == "disabled":
                    chosen, level = rung, i
                    break
                m = self._measure(rung)
                measurements.append({"policy": rung.name, "delta_ppl": m["delta_ppl"], "kld_mean": m["kld_mean"],
                                     "compression_vs_fp16": m.get("compression_vs_fp16")})
                if m["delta_ppl"] <= budget and m["kld_mean"] <= max_kld:
                    chosen, level = rung, i
                    break
            decision = GuardDecision(policy=chosen, stepped_back=level, measurements=measurements)
            if level:
                log.warning("%s", decision.note())
            self._cache[key] = decision
            return decision
