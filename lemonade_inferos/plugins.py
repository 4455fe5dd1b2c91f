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

A plugin named by an entry point or ``INFEROS_PLUGINS`` may be an instance, a class (it is
instantiated with no arguments) or a module with ``@hookimpl`` functions. ``INFEROS_PLUGINS``
entries are ``module:attribute``; the module is imported like any other (installed, or on
``sys.path``, e.g. through ``PYTHONPATH``).

Failures: an exception in a plugin's ``before_request``, ``session_options``,
``execution_providers``, ``run_options`` or ``kv_cache`` is raised as :class:`PluginError`
naming the plugin and the hook (the request fails; hosts report it in one line). An
exception in ``after_request`` is logged with the plugin's name and swallowed, so a
completed generation is never thrown away; the other plugins' ``after_request`` still run.
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


class PluginError(RuntimeError):
    """A plugin raised in a hook. ``plugin`` and ``hook`` name them; the plugin's exception
    is ``__cause__``."""

    def __init__(self, plugin: str, hook: str, error: BaseException):
        self.plugin, self.hook, self.error = plugin, hook, error
        detail = str(error).strip()
        super().__init__(f"plugin {plugin!r} failed in {hook}: {type(error).__name__}"
                         + (f": {detail}" if detail else ""))


BUILTIN_PREFIX = "inferos."


def _call(impl: Any, hook: str, kwargs: dict[str, Any]) -> Any:
    """Call one hook implementation with the arguments it declares; a third-party plugin's
    exception becomes a :class:`PluginError` naming it. The built-in plugins' (``inferos.*``)
    errors pass unchanged: they already say what is wrong (e.g. a ``PolicyError``)."""
    try:
        return impl.function(**{k: kwargs[k] for k in impl.argnames})
    except PluginError:
        raise
    except Exception as e:
        if str(impl.plugin_name).startswith(BUILTIN_PREFIX):
            raise
        raise PluginError(impl.plugin_name, hook, e) from e


def as_plugin(obj: Any, name: str) -> Any:
    """What to register for ``obj``: an instance of it when it is a class (hook methods need
    ``self``), else ``obj`` itself (an instance or a module).

    Raises:
        TypeError: the class cannot be instantiated without arguments (names it).
    """
    if isinstance(obj, type):
        try:
            return obj()
        except TypeError as e:
            raise TypeError(f"plugin {name!r}: class {obj.__qualname__} cannot be created without arguments ({e}); "
                            "name an instance instead (module:instance)") from e
    return obj


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
            res = _call(impl, "before_request", {"context": context, "policy": policy})
            if res is not None:
                policy = _expect(res, Policy, "before_request", impl.plugin_name)
        return policy

    def _first(self, hook: str, types: type | tuple[type, ...], **kwargs: Any) -> Any:
        caller = getattr(self.pm.hook, hook)
        for impl in _impls(caller):
            res = _call(impl, hook, kwargs)
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
        """Run every ``after_request``; a failing plugin is logged by name and skipped (the
        completed generation stands)."""
        for impl in _impls(self.pm.hook.after_request):
            try:
                _call(impl, "after_request", {"context": context, "stats": stats})
            except Exception as e:
                err = e if isinstance(e, PluginError) else PluginError(impl.plugin_name, "after_request", e)
                log.error("%s (the request's result is kept)", err, exc_info=log.isEnabledFor(logging.DEBUG))

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
                pm.register(as_plugin(ep.load(), ep.name), name=ep.name)
                log.info("loaded plugin %s from %s", ep.name, ep.value)
            except Exception as e:  # a broken third-party plugin must not stop the host
                log.warning("skipping plugin %s (%s): %s", ep.name, ep.value, e)
    for ref in sorted(_env_list("INFEROS_PLUGINS") or ()):
        if not wanted(ref):
            continue
        try:
            obj = _load_object(ref)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"INFEROS_PLUGINS: cannot import plugin {ref!r}: {e} (entries are module:attribute; "
                              "the module must be installed or on the Python path, e.g. PYTHONPATH)") from e
        if not pm.has_plugin(ref):
            pm.register(as_plugin(obj, ref), name=ref)
    pm.check_pending()
    return InferosManager(pm)


Factory = Callable[[], InferosManager]
