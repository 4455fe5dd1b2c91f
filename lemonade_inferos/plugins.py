"""Plugin manager: built-in plugins, entry-point discovery, allow/deny lists, no-op mode.

Loading follows simonw/llm's pattern: a pluggy ``PluginManager`` with the specs from
:mod:`lemonade_inferos.hookspecs`, the built-in plugins registered by name, then
``load_setuptools_entrypoints("inferos")`` for third-party distributions.

Environment:

* ``INFEROS_DISABLE=1`` – :func:`get_plugin_manager` returns a :class:`NoopManager`
  (requests pass through with ORT defaults and the full-precision KV cache).
* ``INFEROS_PLUGINS_ALLOW=a,b`` – only these plugin names load (built-ins included).
* ``INFEROS_PLUGINS_DENY=a,b`` – these never load. Deny wins over allow.
* ``INFEROS_PLUGINS=pkg.mod:obj,...`` – extra plugin objects to import and register
  (handy for hosts started as subprocesses, where entry points are not an option).

Built-in plugin names: ``inferos.ort`` (session/run options, providers) and
``inferos.kv`` (the KV store).
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs
from .hookspecs import PROJECT
from .policy import Policy

log = logging.getLogger("lemonade_inferos.plugins")

ENTRY_POINT_GROUP = "inferos"


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _plugin_label(impl: Any) -> str:
    return getattr(impl, "plugin_name", None) or repr(impl.plugin)


def _impls(caller: Any) -> list[Any]:
    """Hook implementations in pluggy call order (LIFO registration, tryfirst/trylast
    respected), wrappers excluded (this façade calls plain implementations only)."""
    return [i for i in reversed(caller.get_hookimpls()) if not (i.hookwrapper or getattr(i, "wrapper", False))]


def _expect(value: Any, types: type | tuple[type, ...], hook: str, who: str) -> Any:
    if value is not None and not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else " | ".join(t.__name__ for t in types)
        raise TypeError(f"plugin {who!r}: hook {hook} returned {type(value).__name__}; expected {names} or None")
    return value


class InferosManager:
    """Typed façade over a pluggy ``PluginManager`` for the ``inferos`` hooks.

    Every call validates what plugins return and raises ``TypeError`` naming the plugin and
    the hook on a wrong type.
    """

    enabled = True

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm

    # -- introspection -------------------------------------------------------------
    def plugin_names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    def register(self, plugin: object, name: str | None = None) -> str | None:
        return self.pm.register(plugin, name=name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        return self.pm.unregister(plugin=plugin, name=name)

    # -- hooks ------------------------------------------------------------------------
    def before_request(self, context: Any, policy: Policy) -> Policy:
        """Fold ``before_request`` over the plugins in pluggy call order (see hookspecs)."""
        caller = self.pm.hook.before_request
        for impl in _impls(caller):
            kwargs = {"context": context, "policy": policy}
            res = impl.function(**{k: kwargs[k] for k in impl.argnames})
            if res is not None:
                policy = _expect(res, Policy, "before_request", impl.plugin_name)
        return policy

    def _first(self, hook: str, types: type | tuple[type, ...], **kwargs: Any) -> Any:
        caller = getattr(self.pm.hook, hook)
        for impl in _impls(caller):
            res = impl.function(**{k: kwargs[k] for k in impl.argnames})
            if res is not None:
                return _expect(res, types, hook, impl.plugin_name)
        return None

    def session_options(self, policy: Policy, spec: Any) -> Any:
        import onnxruntime as ort

        res = self._first("session_options", ort.SessionOptions, policy=policy, spec=spec)
        return res if res is not None else ort.SessionOptions()

    def execution_providers(self, policy: Policy, available: list[str]) -> list[tuple[str, dict]]:
        res = self._first("execution_providers", list, policy=policy, available=available)
        if res is None:
            return [("CPUExecutionProvider", {})]
        for item in res:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict)):
                raise TypeError(f"hook execution_providers must return a list of (name, options) tuples; got item {item!r}")
        return res

    def run_options(self, policy: Policy, context: Any) -> Any:
        import onnxruntime as ort

        res = self._first("run_options", ort.RunOptions, policy=policy, context=context)
        return res if res is not None else ort.RunOptions()

    def kv_cache(self, policy: Policy, spec: Any, context: Any) -> Any:
        from .kv.base import FullPrecisionKVCache, KVCache

        res = self._first("kv_cache", KVCache, policy=policy, spec=spec, context=context)
        return res if res is not None else FullPrecisionKVCache(spec)

    def after_request(self, context: Any, stats: Any) -> None:
        self.pm.hook.after_request(context=context, stats=stats)

    def on_request_error(self, context: Any, error: BaseException) -> None:
        for impl in _impls(self.pm.hook.on_request_error):
            kwargs = {"context": context, "error": error}
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception:  # one plugin must not hide the request's own error
                log.exception("plugin %r failed in on_request_error", impl.plugin_name)


class NoopManager(InferosManager):
    """The disabled manager: no plugins, ORT defaults, full-precision KV cache.

    Same interface as :class:`InferosManager`, so hosts never branch on ``enabled``.
    """

    enabled = False

    def __init__(self) -> None:
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs.InferosSpecs)
        super().__init__(pm)

    def register(self, plugin: object, name: str | None = None) -> str | None:  # noqa: D401
        """Ignored: a disabled manager runs no plugins."""
        return None


def _load_object(ref: str) -> object:
    mod, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def builtin_plugins() -> list[tuple[str, object]]:
    """The built-in ``(name, plugin)`` pairs, in registration order."""
    from .builtin import KVStorePlugin, OrtPolicyPlugin

    return [("inferos.ort", OrtPolicyPlugin()), ("inferos.kv", KVStorePlugin())]


def get_plugin_manager(
    *,
    enabled: bool | None = None,
    extra: Iterable[tuple[str, object]] = (),
    entry_points: bool = True,
) -> InferosManager:
    """Build a plugin manager.

    Args:
        enabled: False returns a :class:`NoopManager`; None reads ``INFEROS_DISABLE``.
        extra: additional ``(name, plugin)`` pairs to register (e.g. the agent client).
        entry_points: load third-party plugins from the entry-point group ``inferos``.

    Raises:
        ImportError: a plugin named in ``INFEROS_PLUGINS`` cannot be imported (the message
            names it). Broken entry points are logged and skipped instead, so a bad
            third-party distribution cannot stop the host.
    """
    if enabled is None:
        enabled = os.environ.get("INFEROS_DISABLE", "").strip().lower() not in ("1", "true", "yes")
    if not enabled:
        return NoopManager()
    allow = _env_list("INFEROS_PLUGINS_ALLOW")
    deny = _env_list("INFEROS_PLUGINS_DENY") or set()

    def wanted(name: str) -> bool:
        return name not in deny and (allow is None or name in allow)

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs.InferosSpecs)
    for name, plugin in [*builtin_plugins(), *extra]:
        if wanted(name):
            pm.register(plugin, name=name)
    if entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if not wanted(ep.name) or pm.has_plugin(ep.name):
                continue
            try:
                pm.register(ep.load(), name=ep.name)
                log.info("loaded plugin %s from %s", ep.name, ep.value)
            except Exception as e:  # a broken third-party plugin must not stop the host
                log.warning("skipping plugin %s (%s): %s", ep.name, ep.value, e)
    for ref in sorted(_env_list("INFEROS_PLUGINS") or ()):
        if not wanted(ref):
            continue
        try:
            obj = _load_object(ref)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"INFEROS_PLUGINS: cannot import plugin {ref!r}: {e}") from e
        if not pm.has_plugin(ref):
            pm.register(obj, name=ref)
    pm.check_pending()
    return InferosManager(pm)


Factory = Callable[[], InferosManager]
