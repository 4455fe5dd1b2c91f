"""Hook specifications: every point where a plugin can act on a generation request.

All hooks belong to the pluggy project ``"inferos"``; implement them with
:data:`hookimpl` and register the object (or ship it under the entry-point group
``inferos``, see :mod:`lemonade_inferos.plugins`). Hooks are always called with keyword
arguments; an implementation may accept any subset of a spec's arguments.

One request, in firing order::

    before_request        PreRun: context + policy in force -> effective policy
    session_options       once per (model, session-affecting policy): -> SessionOptions
    execution_providers   with the session: policy + available providers -> provider list
    run_options           per request: -> RunOptions
    kv_cache              per request: -> the KV store the decode loop will drive
    after_request         PostRun: context + measured stats
    on_request_error      instead of after_request when the request raised

Style after kedro's hook specs: ``before_``/``after_``/``on_..._error``, typed, documented.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort

    from .kv.base import KVCache
    from .model.spec import DecoderSpec
    from .policy import Policy
    from .types import InferenceContext, RunStats

PROJECT = "inferos"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class InferosSpecs:
    """The hook specifications (see the module docstring for the firing order)."""

    @hookspec
    def before_request(self, context: "InferenceContext", policy: "Policy") -> "Policy | None":
        """PreRun: decide the effective policy for one request.

        Fires before anything runs, once per request. Implementations are folded in pluggy
        call order: each receives the policy as returned by the previous one (or the policy
        in force for the first), and may return an adjusted :class:`~lemonade_inferos.policy.Policy`
        or ``None`` to leave it unchanged. Build adjusted policies with
        ``policy.merged({...})`` so they are validated.

        Args:
            context: the request (model, prompt length, batch size, max_new_tokens, target
                TTFT in ms, quality budget).
            policy: the policy so far.

        Returns:
            a Policy or None. Any other type raises ``TypeError`` naming the plugin.
        """

    @hookspec(firstresult=True)
    def session_options(self, policy: "Policy", spec: "DecoderSpec") -> "ort.SessionOptions | None":
        """Build the ``onnxruntime.SessionOptions`` for a model under a policy.

        Fires when the engine needs a session whose key (model file +
        :meth:`Policy.session_key`) is not cached yet. First non-None result wins; the
        built-in implementation (``trylast``) maps ``policy.runtime`` and ``policy.io`` to
        threads, graph optimisation level, execution mode, memory arena/pattern flags and
        session config entries.

        Returns:
            ``onnxruntime.SessionOptions`` or None; another type raises ``TypeError``.
        """

    @hookspec(firstresult=True)
    def execution_providers(self, policy: "Policy", available: list[str]) -> "list[tuple[str, dict[str, Any]]] | None":
        """Choose execution providers (ORT names with their options), most preferred first.

        ``available`` is ``onnxruntime.get_available_providers()``. The built-in
        implementation maps ``policy.scheduler`` to VitisAI (NPU) / DirectML / CPU and falls
        back, with a log line, to what is available. CPU is always appended last.

        Returns:
            list of ``(provider_name, options)`` or None; another type raises ``TypeError``.
        """

    @hookspec(firstresult=True)
    def run_options(self, policy: "Policy", context: "InferenceContext") -> "ort.RunOptions | None":
        """Build the per-request ``onnxruntime.RunOptions`` (log severity, run tag = request
        id, arena shrinkage, and ``terminate`` for deadline cancellation).

        Returns:
            ``onnxruntime.RunOptions`` or None; another type raises ``TypeError``.
        """

    @hookspec(firstresult=True)
    def kv_cache(self, policy: "Policy", spec: "DecoderSpec", context: "InferenceContext") -> "KVCache | None":
        """Create the KV store for one request.

        The built-in implementation (``trylast``) returns the full-precision store when
        ``policy.kv.mode == "disabled"`` or the model folder has no tiered graph, and the
        tiered quantized store otherwise.

        Returns:
            a :class:`~lemonade_inferos.kv.base.KVCache` or None; another type raises ``TypeError``.
        """

    @hookspec
    def after_request(self, context: "InferenceContext", stats: "RunStats") -> None:
        """PostRun: the request finished; ``stats`` holds what was measured.

        Fires once per successful request, after the last token. Must not block: the agent
        client plugin only enqueues the stats here. Return values are ignored.
        """

    @hookspec
    def on_request_error(self, context: "InferenceContext", error: BaseException) -> None:
        """The request raised ``error``; fires instead of ``after_request``.

        The error is re-raised to the host after all implementations ran. Exceptions raised
        by implementations are logged and swallowed so one plugin cannot hide the error.
        """
