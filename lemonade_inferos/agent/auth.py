"""The agent token: where it comes from, how it is stored, how it is checked.

* ``INFEROS_AGENT_TOKEN`` wins when set (non-empty).
* Otherwise the token file ``<config dir>/agent-token`` (see
  :func:`lemonade_inferos.agent.settings.token_path`) is read; the agent creates it once
  with :func:`secrets.token_urlsafe` (256 bits), mode 0600 in a 0700 directory.
* The token is never printed or logged in full: use :func:`fingerprint`.
* Checks use :func:`hmac.compare_digest` (constant time).

Stdlib only: the plugin-side client imports this module without FastAPI.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import sys
from pathlib import Path

from .settings import token_path

log = logging.getLogger("lemonade_inferos.agent.auth")

ENV_TOKEN = "INFEROS_AGENT_TOKEN"
MIN_TOKEN_CHARS = 16


class TokenError(RuntimeError):
    """No usable token (unreadable file, too short, ...)."""


def fingerprint(token: str) -> str:
    """A short non-secret label for logs: ``sha256:`` + 8 hex chars of the token's hash."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:8]


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def read_token_file(path: Path | None = None) -> str | None:
    """The token stored in ``path`` (default: the user's token file), or None if absent/empty."""
    p = path or token_path()
    try:
        tok = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TokenError(f"cannot read token file {p}: {e}") from e
    return tok or None


def configured_token(path: Path | None = None) -> tuple[str | None, str]:
    """The token a user has provisioned, without creating one.

    Returns:
        ``(token_or_None, source)`` where source is ``"env"``, ``"file"`` or ``"none"``.
    """
    env = os.environ.get(ENV_TOKEN, "").strip()
    if env:
        return env, "env"
    tok = read_token_file(path)
    return (tok, "file") if tok else (None, "none")


def _write_new_token(p: Path) -> str:
    p.parent.mkdir(parents=True, exist_ok=True)
    if sys.platform != "win32":
        try:
            os.chmod(p.parent, 0o700)
        except OSError:  # pragma: no cover - directory owned by someone else
            pass
    tok = secrets.token_urlsafe(32)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(p, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(tok + "\n")
    return tok


def load_or_create_token(path: Path | None = None) -> tuple[str, str]:
    """The agent's token: env var, else the token file, else a new token written to the file.

    An existing token file readable by others is tightened to 0600 (with a warning).

    Returns:
        ``(token, source)``; source is ``"env"``, ``"file"`` or ``"generated"``.

    Raises:
        TokenError: the token is shorter than 16 characters or the file cannot be used.
    """
    p = path or token_path()
    tok, source = configured_token(p)
    if tok is None:
        try:
            tok, source = _write_new_token(p), "generated"
        except FileExistsError:  # another process created it between our read and write
            tok, source = read_token_file(p), "file"
        except OSError as e:
            raise TokenError(f"cannot create token file {p}: {e}") from e
        if not tok:
            raise TokenError(f"token file {p} is empty")
        log.info("generated a new agent token (%s) in %s", fingerprint(tok), p)
    elif source == "file" and sys.platform != "win32":
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            log.warning("token file %s had mode %o; setting 0600", p, mode)
            os.chmod(p, 0o600)
    if len(tok) < MIN_TOKEN_CHARS:
        raise TokenError(f"agent token from {source} is {len(tok)} characters; at least {MIN_TOKEN_CHARS} are required")
    return tok, source
