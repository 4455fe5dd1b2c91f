"""Where the agent keeps things, and its own (non-policy) configuration.

Paths
-----
* config dir: ``$INFEROS_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/lemonade-inferos``, else
  ``~/.config/lemonade-inferos`` (``%APPDATA%\\lemonade-inferos`` on Windows). Holds the
  token file ``agent-token``.
* state dir: ``--state-dir``, else ``$INFEROS_STATE_DIR``, else
  ``$XDG_DATA_HOME/lemonade-inferos/agent``, else ``~/.local/share/lemonade-inferos/agent``
  (``%LOCALAPPDATA%\\lemonade-inferos\\agent`` on Windows). Holds ``history.sqlite3``.

Config file (``inferos agent --config FILE``, YAML or JSON)
----------------------------------------------------------
Either the seed guide's shape — a policy document under ``infer_os:`` — or/and an
``agent:`` section with :class:`AgentConfig` fields, and optionally ``policy:`` naming a
preset or a policy file::

    agent:
      window_seconds: 60
      history_max_rows: 100000
    policy: default          # preset name or file; merged under infer_os below if both
    infer_os:
      kv: {recent_window: 128}
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

APP_DIR_NAME = "lemonade-inferos"
TOKEN_FILE_NAME = "agent-token"
HISTORY_FILE_NAME = "history.sqlite3"


def config_dir() -> Path:
    """The user's config directory for lemonade-inferos (see the module docstring)."""
    env = os.environ.get("INFEROS_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":  # pragma: no cover - not on the test machines
        base = os.environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
        return Path(base) / APP_DIR_NAME
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / APP_DIR_NAME


def token_path() -> Path:
    """The token file: ``<config dir>/agent-token`` (mode 0600)."""
    return config_dir() / TOKEN_FILE_NAME


def default_state_dir() -> Path:
    """The agent's state directory (history database) when ``--state-dir`` is not given."""
    env = os.environ.get("INFEROS_STATE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":  # pragma: no cover
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / APP_DIR_NAME / "agent"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / APP_DIR_NAME / "agent"


class ConfigError(ValueError):
    """The agent config is invalid. ``errors`` lists ``{"field", "value", "message"}``
    (the same shape as :class:`lemonade_inferos.policy.PolicyError`)."""

    def __init__(self, errors: list[dict[str, Any]]):
        self.errors = errors
        super().__init__(
            "invalid agent config: "
            + "; ".join(f"{e['field']}: {e['message']} (got {e['value']!r})" for e in errors)
        )


class AgentConfig(BaseModel):
    """The agent's own settings (``GET|POST /v1/config``). Not the inference policy."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    window_seconds: float = Field(
        60.0, ge=1.0, le=3600.0, description="sliding metrics window, seconds (1..3600)"
    )
    history_max_rows: int = Field(
        100_000, ge=100, le=10_000_000,
        description="reports kept in the history database; older rows are deleted (100..10,000,000)",
    )
    baseline_reference_size: int = Field(
        200, ge=1, le=100_000,
        description="how many most recent baseline-mode reports form the ΔPPL reference when the "
        "window itself holds none",
    )

    def merged(self, partial: Any) -> "AgentConfig":
        """A new config: the mapping ``partial`` over this one, validated.

        Raises:
            ConfigError: naming each bad field, the value and what is allowed.
        """
        if not isinstance(partial, dict):
            raise ConfigError([{"field": "(root)", "value": type(partial).__name__, "message": "must be a JSON object"}])
        return validate_config({**self.model_dump(), **partial})


def validate_config(doc: dict[str, Any]) -> AgentConfig:
    """Validate a config mapping; missing fields take defaults.

    Raises:
        ConfigError: naming each bad field, its value and what is allowed.
    """
    try:
        return AgentConfig.model_validate(doc)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(root)"
            msg = "unknown field; known: " + ", ".join(AgentConfig.model_fields) if err["type"] == "extra_forbidden" else err["msg"]
            errors.append({"field": field, "value": err.get("input"), "message": msg})
        raise ConfigError(errors) from None


def load_config_file(path: str | Path) -> tuple[AgentConfig, dict[str, Any] | None, str | None]:
    """Read an agent config file (YAML or JSON; see the module docstring).

    Returns:
        ``(config, policy_document_or_None, policy_spec_or_None)``: the agent config, the
        ``infer_os`` policy document if present, and the ``policy:`` preset/file if present.

    Raises:
        ConfigError: the file is missing, unparsable, or has bad/unknown keys.
    """
    from ..policy import read_structured_file

    try:
        doc = read_structured_file(path)
    except FileNotFoundError:
        raise ConfigError([{"field": "(file)", "value": str(path), "message": "no such config file"}]) from None
    except ValueError as e:
        raise ConfigError([{"field": "(file)", "value": str(path), "message": str(e)}]) from None
    if not isinstance(doc, dict):
        raise ConfigError([{"field": "(root)", "value": type(doc).__name__, "message": "must be a mapping"}])
    unknown = sorted(set(doc) - {"agent", "infer_os", "policy"})
    if unknown:
        raise ConfigError(
            [{"field": k, "value": doc[k], "message": "unknown top-level key; known: agent, infer_os, policy"} for k in unknown]
        )
    agent = doc.get("agent") or {}
    if not isinstance(agent, dict):
        raise ConfigError([{"field": "agent", "value": agent, "message": "must be a mapping"}])
    cfg = validate_config(agent)
    pol_doc = doc.get("infer_os")
    if pol_doc is not None and not isinstance(pol_doc, dict):
        raise ConfigError([{"field": "infer_os", "value": pol_doc, "message": "must be a mapping (a policy document)"}])
    spec = doc.get("policy")
    if spec is not None and not isinstance(spec, str):
        raise ConfigError([{"field": "policy", "value": spec, "message": "must be a preset name or a policy file path"}])
    base = Path(path).parent
    if spec and not Path(spec).is_absolute() and (base / spec).is_file():
        spec = str(base / spec)
    return cfg, pol_doc, spec
