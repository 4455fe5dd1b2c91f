"""Chat messages → one prompt string, the way Hugging Face ``apply_chat_template`` does it.

The template comes from the model folder, in this order:

1. ``chat_template.jinja`` (newer Hugging Face layout);
2. ``tokenizer_config.json`` → ``chat_template`` (a string, or a list of
   ``{"name", "template"}`` of which ``"default"`` is used);
3. otherwise :data:`PLAIN_TEMPLATE`, a documented plain-text format::

       System: <system message>
       User: <user message>
       Assistant: <assistant message>
       Assistant:                      <- generation prompt

The template is rendered with jinja2's ``ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)`` and the globals Hugging Face passes: ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token`` (plus ``unk_token``/``pad_token``
when the config names them), ``raise_exception(msg)`` and ``strftime_now(fmt)``, and the
``tojson`` filter with HF's arguments. The engine's tokenizer adds BOS once (never twice,
even when the template writes ``bos_token`` itself).

Messages are validated here, at the HTTP boundary: :class:`ChatFormatError` names the
offending field (``messages[2].content``) so the server can answer OpenAI's 400 shape.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The fallback template (same "System:/User:/Assistant:" style as the embedded model's).
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'tool' %}{{ 'Tool: ' + message['content'] + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A chat request's messages are malformed. ``param`` names the field (OpenAI style)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Hugging Face's tojson: no HTML escaping (jinja2's own filter escapes < > & ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return time.strftime(fmt)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate OpenAI chat ``messages`` and return them with string ``content``.

    Accepts ``content`` as a string, null (assistant turns with tool calls), or a list of
    parts of which only ``{"type": "text", "text": ...}`` is supported (parts are joined
    with no separator, as OpenAI does for text). Role ``developer`` is treated as
    ``system`` (OpenAI's newer name for it).

    Raises:
        ChatFormatError: naming the offending field.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(
            f"messages={_short(messages)} is not allowed; must be a non-empty list of "
            "{'role': ..., 'content': ...} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatFormatError(f"{where} must be an object with 'role' and 'content'; got {_short(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(
                f"{where}.role={_short(role)} is not allowed; must be one of {', '.join(ROLES)}", f"{where}.role")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise ChatFormatError(f"{where}.content is required for role {role!r}", f"{where}.content")
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ChatFormatError(
                        f"{where}.content[{j}] of type {_short(kind)} is not supported; this backend takes "
                        "text parts only ({'type': 'text', 'text': ...})", f"{where}.content[{j}]")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ChatFormatError(
                f"{where}.content must be a string or a list of text parts; got {type(content).__name__}",
                f"{where}.content")
        msg = {k: v for k, v in m.items() if k not in ("role", "content")}
        msg.update(role="system" if role == "developer" else role, content=content)
        out.append(msg)
    return out


def _short(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


@dataclass
class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference.

    Attributes:
        source: the template text.
        origin: where it came from (a file path, or ``"plain (built-in)"``).
        bos_token / eos_token: the tokens' text (``""`` when unknown).
    """

    source: str
    origin: str
    bos_token: str = ""
    eos_token: str = ""
    extra_tokens: dict[str, str] | None = None

    def __post_init__(self) -> None:
        from jinja2.exceptions import TemplateSyntaxError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except TemplateSyntaxError as e:
            raise ValueError(f"chat template from {self.origin} does not compile: {e}") from e

    @classmethod
    def from_model_dir(cls, folder: str | Path) -> "ChatTemplate":
        """The template of a model folder (see the module docstring), else the plain one."""
        folder = Path(folder)
        cfg: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                cfg = {}
        tokens = {k: _token_text(cfg.get(k)) or "" for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        extra = {k: v for k, v in tokens.items() if k in ("unk_token", "pad_token") and v}
        jinja_file = folder / "chat_template.jinja"
        source, origin = None, None
        if jinja_file.is_file():
            source, origin = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        else:
            tmpl = cfg.get("chat_template")
            if isinstance(tmpl, list):
                named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
                tmpl = named.get("default") or next(iter(named.values()), None)
            if isinstance(tmpl, str) and tmpl.strip():
                source, origin = tmpl, f"{cfg_path} (chat_template)"
        if source is None:
            source, origin = PLAIN_TEMPLATE, "plain (built-in)"
        return cls(source, origin, tokens["bos_token"], tokens["eos_token"], extra)

    @classmethod
    def plain(cls) -> "ChatTemplate":
        return cls(PLAIN_TEMPLATE, "plain (built-in)")

    @property
    def is_plain(self) -> bool:
        """True for the plain "User:/Assistant:" formats (the built-in fallback and the one
        ``inferos convert llama2c`` writes for story models), False for a model's own chat
        format (ChatML, Llama 3, ...)."""
        from ..model.tokenizer import CHAT_TEMPLATE as LLAMA2C_TEMPLATE

        return self.source in (PLAIN_TEMPLATE, LLAMA2C_TEMPLATE)

    def render(self, messages: Any, *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for ``messages`` (validated with :func:`normalize_messages`).

        Raises:
            ChatFormatError: malformed messages, or the template refused them
                (``raise_exception`` in the template, e.g. "roles must alternate").
        """
        from jinja2.exceptions import TemplateError

        msgs = normalize_messages(messages)
        try:
            return self._template.render(
                messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                eos_token=self.eos_token, **(self.extra_tokens or {}), **kwargs,
            )
        except TemplateError as e:
            raise ChatFormatError(f"the model's chat template rejected the messages: {e}", "messages") from e
