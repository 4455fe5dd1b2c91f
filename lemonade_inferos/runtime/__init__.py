"""The adaptive runtime: the guide's fallback table (:mod:`.fallback`), provider failover
within a request (:mod:`.providers`), backoff (:mod:`.backoff`) and the fast/mid/slow
control loops (:mod:`.loops`). :class:`AdaptiveRuntime` wires them to an engine and its
resource manager."""

from __future__ import annotations

import time
from typing import Any, Callable

from .fallback import FallbackManager, Observation, Settings
from .loops import ControlLoops
from .providers import ProviderFailover

__all__ = ["AdaptiveRuntime", "FallbackManager", "Observation", "Settings", "ControlLoops", "ProviderFailover"]


def observe_machine(telemetry: Any, manager: Any = None, providers: Callable[[], list[str]] | None = None,
                    agent: Any = None) -> Callable[[], Observation]:
    """The mid loop's probe: providers, NPU presence/temperature (accel devices), memory use
    (the larger of KV budget reserved/total and host used/usable), agent reachability."""
    def probe() -> Observation:
        import onnxruntime as ort

        s = telemetry.sample()
        npus = [d for d in s["devices"] if d.kind == "npu"]
        temps = [d.temperature_c for d in npus if d.temperature_c is not None]
        host = s["host"]
        fr = [host.memory_fraction or 0.0]
        if manager is not None:
            b = manager.budget
            fr.append(b.reserved_bytes / b.total_bytes)
        provs = providers() if providers else ort.get_available_providers()
        return Observation(
            providers=provs,
            npu_present=bool(npus) or "VitisAIExecutionProvider" in provs,
            npu_temperature_c=max(temps) if temps else None,
            memory_fraction=max(fr),
            agent_reachable=None if agent is None else bool(agent.agent_available),
        )

    return probe


def quality_probe(engine: Any, sample_tokens: int = 256) -> Callable[[Any], dict[str, Any] | None]:
    """The slow loop's probe: ΔPPL and mean KLD of ``policy`` vs full precision through the
    cached decode path (:func:`lemonade_inferos.quality.evaluate_ids`) on a
    ``sample_tokens``-token sample of the model's own text (sampled once from BOS at
    temperature 1, seed 0, as the quality guard's calibration text, but only as long as the
    sample -- not a whole context, which is 8K tokens on real models)."""
    sample: list[int] = []

    def probe(policy: Any) -> dict[str, Any] | None:
        if engine.backend != "ort" or policy.kv.mode == "disabled":
            return None
        from ..engine.sampling import GenerationConfig
        from ..quality import evaluate_ids

        if not sample:
            n = min(sample_tokens, engine.spec.context_length) - 1
            res = engine.generate([engine.spec.bos_token_id], GenerationConfig(
                max_new_tokens=n, temperature=1.0, seed=0, stop_on_eos=False), baseline=True)
            sample.extend([engine.spec.bos_token_id, *res.token_ids])
        r = evaluate_ids(engine, sample, policy)
        return {"delta_ppl": r["delta_ppl"], "kld": r["kld_mean"], "ppl": r["ppl"],
                "ppl_baseline": r["ppl_baseline"], "tokens": r["tokens"], "method": "cached decode path, calibration sample"}

    return probe


class AdaptiveRuntime:
    """Fallback table + loops + failover for one engine.

    Args:
        engine: the :class:`~lemonade_inferos.engine.Engine`; its ``failover`` reports device
            errors here, and its resource manager (if any) applies the table's actions to
            every admitted request and evicts idle sessions under memory pressure.
        telemetry: a :class:`~lemonade_inferos.resources.Telemetry` for the mid loop.
        evaluate: slow-loop quality probe (default: the engine's quality guard measurement).
        clock: monotonic seconds.
    """

    def __init__(self, engine: Any, telemetry: Any = None, *, settings: Settings | None = None,
                 evaluate: Callable[[Any], dict[str, Any] | None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 providers: Callable[[], list[str]] | None = None, agent: Any = None):
        from ..resources import Telemetry

        self.engine = engine
        self.agent = agent
        self.fallback = FallbackManager(settings, clock=clock, wall=wall, on_event=self._on_event)
        engine.failover.fallback = self.fallback
        rm = getattr(engine, "resources", None)
        if rm is not None:
            rm.overrides = self.fallback.apply
            rm.runtime_status = self.status
        self.telemetry = telemetry or Telemetry()
        self.loops = ControlLoops(lambda: engine.policy, self.fallback,
                                  observe=observe_machine(self.telemetry, rm, providers, agent),
                                  evaluate=evaluate if evaluate is not None else quality_probe(engine),
                                  clock=clock)

    def _on_event(self, ev: dict[str, Any]) -> None:
        rm = getattr(self.engine, "resources", None)
        if ev["kind"] == "fallback" and ev["reason"] == "memory_pressure" and rm is not None:
            ev["sessions_evicted"] = rm.relieve(idle_s=0.0)
        post = getattr(self.agent, "post_event", None)
        if post is not None:  # the agent event of the guide's notification chain
            post(ev)

    def apply(self, policy: Any, context: Any = None) -> Any:
        """The fast loop: the table's actions on one request's policy."""
        return self.fallback.apply(policy, context)

    def status(self) -> dict[str, Any]:
        return {"fallback": self.fallback.status(), "loops": self.loops.status(),
                "providers": self.engine.failover.status()}
