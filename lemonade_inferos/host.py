"""What every host (CLI, ``inferos serve``, the Lemonade wrapper) needs to start a request
pipeline: the plugin manager with the agent client when one is configured, and an engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .plugins import InferosManager, get_plugin_manager
from .policy import Policy, load_policy

log = logging.getLogger("lemonade_inferos.host")


def host_plugin_manager(**kwargs: Any) -> InferosManager:
    """:func:`~lemonade_inferos.plugins.get_plugin_manager` plus the control-agent client
    plugin (registered as ``inferos.agent``) when ``INFEROS_AGENT_URL`` is set."""
    extra = list(kwargs.pop("extra", ()))
    try:
        from .client import agent_plugin_from_env
    except ImportError:  # agent client not installed in this build
        agent_plugin_from_env = None  # type: ignore[assignment]
    if agent_plugin_from_env is not None:
        plugin = agent_plugin_from_env()
        if plugin is not None:
            extra.append(("inferos.agent", plugin))
    return get_plugin_manager(extra=extra, **kwargs)


def build_engine(model: str | Path | None = None, policy: str | Path | Policy | None = None, **kwargs: Any) -> Any:
    """An :class:`~lemonade_inferos.engine.Engine` for ``model`` with the host plugin manager
    and ``policy`` (preset name, file, Policy, or None = default).

    ``model`` is a model folder, a known model name (``smollm2-135m-instruct``: fetched and
    converted on first use, see :mod:`lemonade_inferos.model.registry`), or None (the
    embedded stories260K model).

    Raises:
        PolicyError: the policy cannot be loaded.
        ModelFolderError: the model folder is unusable, or ``model`` is neither a folder nor
            a known model name.
    """
    from .engine import Engine
    from .model.registry import resolve_model

    pol = policy if isinstance(policy, Policy) else load_policy(policy)
    progress = kwargs.pop("progress", None)
    return Engine(resolve_model(model, progress), pm=kwargs.pop("pm", None) or host_plugin_manager(), policy=pol, **kwargs)
