"""What every host (CLI, ``inferos serve``, the Lemonade wrapper) needs to start a request
pipeline: the plugin manager with the agent client when one is configured, and an engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .plugins import InferosManager, get_plugin_manager
from .policy import Policy, load_policy

log = logging.getLogger("lemonade_inferos.host")


def host_plugin_manager(*, follow_agent_policy: bool = True, **kwargs: Any) -> InferosManager:
    """:func:`~lemonade_inferos.plugins.get_plugin_manager` plus the control-agent client
    plugin (registered as ``inferos.agent``) when ``INFEROS_AGENT_URL`` is set.

    ``follow_agent_policy=False``: the agent receives the stats but does not choose the
    policy (a command given an explicit ``--policy``; see :func:`build_engine`)."""
    extra = list(kwargs.pop("extra", ()))
    try:
        from .client import agent_plugin_from_env
    except ImportError:  # agent client not installed in this build
        agent_plugin_from_env = None  # type: ignore[assignment]
    if agent_plugin_from_env is not None:
        plugin = agent_plugin_from_env(follow_policy=follow_agent_policy)
        if plugin is not None:
            extra.append(("inferos.agent", plugin))
    return get_plugin_manager(extra=extra, **kwargs)


def build_engine(model: str | Path | None = None, policy: str | Path | Policy | None = None, **kwargs: Any) -> Any:
    """An :class:`~lemonade_inferos.engine.Engine` for ``model`` with the host plugin manager
    and ``policy`` (preset name, file, Policy, or None = default).

    ``model`` is a model folder, a known model name (``smollm2-135m-instruct``: fetched and
    converted on first use, see :mod:`lemonade_inferos.model.registry`), or None (the
    embedded stories260K model).

    Policy precedence (the README's "Which policy runs"): an explicit ``policy`` (a command's
    ``--policy``) is the policy every request of this engine runs with, even when
    ``INFEROS_AGENT_URL`` is set (the agent still gets the stats); with ``policy=None`` the
    agent's policy runs when an agent is configured, else the ``default`` preset. Plugins may
    still adjust it per request; ``RunStats.policy_name`` names what actually ran.

    Raises:
        PolicyError: the policy cannot be loaded.
        ModelFolderError: the model folder is unusable, or ``model`` is neither a folder nor
            a known model name.
    """
    from .engine import Engine
    from .model.registry import resolve_model

    pol = policy if isinstance(policy, Policy) else load_policy(policy)
    progress = kwargs.pop("progress", None)
    pm = kwargs.pop("pm", None) or host_plugin_manager(follow_agent_policy=policy is None)
    return Engine(resolve_model(model, progress), pm=pm, policy=pol, **kwargs)
