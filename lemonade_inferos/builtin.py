"""Built-in plugins: ORT policy injection and the KV store choice.

Both implement their hooks ``trylast`` so any third-party plugin returning a value wins.
"""

from __future__ import annotations

import logging
from typing import Any

from . import ort_options
from .hookspecs import hookimpl
from .policy import Policy

log = logging.getLogger("lemonade_inferos.builtin")


class OrtPolicyPlugin:
    """Maps the policy onto ``SessionOptions``, ``RunOptions`` and the provider chain."""

    @hookimpl(trylast=True)
    def session_options(self, policy: Policy) -> Any:
        return ort_options.session_options(policy)

    @hookimpl(trylast=True)
    def execution_providers(self, policy: Policy, available: list[str]) -> list[tuple[str, dict]]:
        return ort_options.execution_providers(policy, available)

    @hookimpl(trylast=True)
    def run_options(self, policy: Policy, context: Any) -> Any:
        return ort_options.run_options(policy, context.request_id)


class KVStorePlugin:
    """Chooses the KV store: tiered quantized when the policy and the model folder allow it."""

    @hookimpl(trylast=True)
    def kv_cache(self, policy: Policy, spec: Any, context: Any) -> Any:
        from .kv.base import FullPrecisionKVCache

        if policy.kv.mode == "disabled":
            return FullPrecisionKVCache(spec)
        if not spec.tiered_model_path.is_file():
            context.extra.setdefault("notes", []).append(
                f"KV store not active: {spec.folder.name} has no model_tiered.onnx"
            )
            return FullPrecisionKVCache(spec)
        from .kv.store import TieredKVCache

        return TieredKVCache(spec, policy)
