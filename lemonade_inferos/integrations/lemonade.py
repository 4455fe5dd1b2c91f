"""Lemonade Server (Python, v9.1.4) integration: per-request policy, hooks and the KV store.

Lemonade has no plugin mechanism, so the integration wraps
``lemonade.tools.oga.utils.OrtGenaiModel`` in place when that module is imported:

* ``__init__(input_folder)`` builds the ``og.Model`` from an ``og.Config(input_folder)``
  with the load-time policy's session and provider options overlaid
  (:func:`lemonade_inferos.ort_options.genai_overlay`), instead of ``og.Model(input_folder)``.
  When the folder is a decoder the inferos engine can drive (``genai_config.json`` decoder
  with ``past_key_values.%d.key`` inputs and its ``model.onnx`` present), it also opens an
  :class:`lemonade_inferos.engine.Engine` on it.
* ``generate(input_ids, ..., streamer=None, stopping_criteria=None, ...)`` keeps Lemonade's
  contract (one ``streamer.add_text()`` per generated token then ``streamer.done()``; or,
  without a streamer, ``[prompt + generated ids]`` returned) and either runs the inferos
  engine (quantized KV store; the engine fires the hooks) or Lemonade's own
  onnxruntime-genai loop with the request's policy applied to the search options; the
  hooks ``before_request`` / ``after_request`` / ``on_request_error`` fire around it and
  the stats note that the inferos KV store is not active for that model.

Activation (any of):

* ``INFEROS_ENABLED=1`` in the environment of a Lemonade process whose site-packages holds
  ``lemonade_inferos.pth`` (the wheel ships it, so ``pip install lemonade-inferos`` puts it
  there; :func:`install_pth` writes it for other layouts); the ``.pth`` runs
  :mod:`._pth_loader`, which installs :func:`install_import_hook`;
* :func:`run_lemonade` (``inferos lemonade serve ...``), which sets ``INFEROS_ENABLED=1`` and
  runs ``lemonade-server-dev``;
* a loader calling the ``lemonade.plugins`` entry point ``inferos`` = :func:`activate`
  (our ``.pth`` loader does this for every distribution's ``lemonade.plugins`` entry points
  when the ``lemonade`` package is first imported).

Nothing heavy is imported by this module: Lemonade, onnxruntime(-genai), pluggy and pydantic
are imported only once Lemonade itself imports ``lemonade.tools.oga.utils``.

Environment:

* ``INFEROS_ENABLED`` – switch (read by the ``.pth`` loader).
* ``INFEROS_POLICY`` – base policy for Lemonade requests: preset name or YAML/JSON file
  (default: the ``default`` preset).
* ``INFEROS_LEMONADE_ENGINE=0`` – never run the inferos engine; always use Lemonade's
  onnxruntime-genai loop (policy + hooks still apply).
* ``INFEROS_LEMONADE_SERVER`` – path of the ``lemonade-server-dev`` executable for
  :func:`run_lemonade` (else searched next to ``INFEROS_LEMONADE_PYTHON`` and on ``PATH``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("lemonade_inferos.lemonade")

#: The Lemonade release this integration is written and tested against.
LEMONADE_VERSION = "9.1.4"
OGA_UTILS = "lemonade.tools.oga.utils"
PLUGIN_GROUP = "lemonade.plugins"
PTH_FILENAME = "lemonade_inferos.pth"
#: The whole content of the ``.pth`` file (same as ``hooks/lemonade/lemonade_inferos.pth``).
PTH_LINE = "import lemonade_inferos.integrations._pth_loader\n"
ENGINE_ENV = "INFEROS_LEMONADE_ENGINE"
POLICY_ENV = "INFEROS_POLICY"
SERVER_ENV = "INFEROS_LEMONADE_SERVER"
PYTHON_ENV = "INFEROS_LEMONADE_PYTHON"

INSTALL_HINT = f"""\
Lemonade Server {LEMONADE_VERSION} (the Python 'lemonade-server-dev') is not installed.
It is not on the package index; install it from source into its own environment:

    git clone --branch v{LEMONADE_VERSION} --depth 1 https://github.com/lemonade-sdk/lemonade.git lemonade-src
    python3.11 -m venv lemonade-venv
    lemonade-venv/bin/pip install "./lemonade-src[oga-cpu]"
    lemonade-venv/bin/pip install lemonade-inferos   # or the path of a checkout or wheel

(the lemonade-inferos wheel ships the start-up hook lemonade_inferos.pth, so no further
step is needed), then point inferos at it with INFEROS_LEMONADE_PYTHON=lemonade-venv/bin/python
(or put lemonade-venv/bin on PATH)."""

_TRUTHY = frozenset({"1", "true", "yes", "on"})


class LemonadeNotInstalled(RuntimeError):
    """``lemonade-server-dev`` cannot be found; the message says how to install it."""


# ---------------------------------------------------------------------------------------
# Lazy activation: a sys.meta_path finder that runs callbacks after given modules execute
# ---------------------------------------------------------------------------------------
class _PostImportHook:
    """Meta-path finder calling ``callback(module)`` right after a watched module executes.

    It finds nothing itself: for a watched name it asks the finders after it for the real
    spec and wraps that spec's loader ``exec_module`` (the loader instance belongs to that
    one spec), so every other loader behaviour is unchanged. Callback failures are logged
    and never propagate into the importing host.
    """

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[Any], None]]] = {}
        self._lock = threading.RLock()

    def watch(self, name: str, callback: Callable[[Any], None]) -> None:
        """Run ``callback(module)`` once ``name`` is imported (now, if it already is)."""
        with self._lock:
            module = sys.modules.get(name)
            if module is None:
                cbs = self.callbacks.setdefault(name, [])
                if callback not in cbs:
                    cbs.append(callback)
                return
        _safe_call(callback, module)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            original_exec(module)
            with self._lock:
                cbs = self.callbacks.pop(fullname, [])
            for cb in cbs:
                _safe_call(cb, module)

        loader.exec_module = exec_module
        return spec

    def invalidate_caches(self) -> None:
        pass


def _safe_call(callback: Callable[[Any], None], module: Any) -> None:
    try:
        callback(module)
    except Exception as e:  # noqa: BLE001 - an integration failure must not break the host
        log.warning("lemonade-inferos: %s failed on %s (%s: %s); Lemonade continues unpatched",
                    getattr(callback, "__name__", callback), getattr(module, "__name__", module),
                    type(e).__name__, e)


_HOOK: _PostImportHook | None = None


def _hook() -> _PostImportHook:
    global _HOOK
    if _HOOK is None or _HOOK not in sys.meta_path:
        _HOOK = _PostImportHook()
        sys.meta_path.insert(0, _HOOK)
    return _HOOK


def install_import_hook(load_entry_points: bool = False) -> None:
    """Patch Lemonade lazily: when (or if) ``lemonade.tools.oga.utils`` is imported.

    Args:
        load_entry_points: also run every ``lemonade.plugins`` entry point when the
            ``lemonade`` package is first imported (the ``.pth`` loader's job); our own
            entry point :func:`activate` is run even when it is not registered as one.

    Never imports Lemonade itself; if it is already imported, patches immediately.
    """
    hook = _hook()
    if load_entry_points:
        hook.watch("lemonade", _run_lemonade_plugins)
    hook.watch(OGA_UTILS, patch_oga_utils)


def uninstall_import_hook() -> None:
    """Remove the import hook (patches already applied stay; see :func:`unpatch_oga_utils`)."""
    global _HOOK
    if _HOOK is not None and _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
    _HOOK = None


def activate(*_args: Any, **_kwargs: Any) -> None:
    """Entry point ``lemonade.plugins: inferos`` – switch the integration on in this process.

    Accepts and ignores any arguments a plugin loader may pass (e.g. the host object).
    Idempotent; patching itself is deferred until ``lemonade.tools.oga.utils`` is imported.
    """
    install_import_hook()


def _run_lemonade_plugins(_module: Any = None) -> None:
    from importlib import metadata

    ours = f"{__name__}:activate"
    ran_ours = False
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()()
            ran_ours = ran_ours or ep.value.replace(" ", "") == ours
        except Exception as e:  # noqa: BLE001 - one broken plugin must not stop Lemonade
            log.warning("lemonade-inferos: lemonade plugin %s (%s) failed: %s", ep.name, ep.value, e)
    if not ran_ours:
        activate()


# ---------------------------------------------------------------------------------------
# Patching OrtGenaiModel
# ---------------------------------------------------------------------------------------
_PATCH_ATTR = "_inferos_original"


def patch_oga_utils(module: Any) -> bool:
    """Wrap ``module.OrtGenaiModel.__init__`` and ``generate`` in place.

    Args:
        module: the imported ``lemonade.tools.oga.utils`` module.

    Returns:
        True when patched now, False when it already was.

    Raises:
        AttributeError: the module has no ``OrtGenaiModel`` (not a supported Lemonade).
    """
    cls = module.OrtGenaiModel
    if _PATCH_ATTR in cls.__dict__:
        return False
    orig_init = cls.__init__
    orig_generate = cls.generate
    gen_sig = inspect.signature(orig_generate)
    init_params = list(inspect.signature(orig_init).parameters)
    og = module.og

    def __init__(self: Any, input_folder: Any, *args: Any, **kwargs: Any) -> None:
        runtime = None
        try:
            runtime = LemonadeRuntime(str(input_folder))
        except Exception as e:  # noqa: BLE001
            log.warning("lemonade-inferos: not active for %s (%s: %s)", input_folder, type(e).__name__, e)
        if runtime is None or args or kwargs or init_params != ["self", "input_folder"]:
            orig_init(self, input_folder, *args, **kwargs)
        else:
            # OrtGenaiModel.__init__ in v9.1.4: ModelAdapter init, og.Model(folder),
            # type "ort-genai", config from load_config(folder). Same, with og.Config.
            super(cls, self).__init__()
            self.model = runtime.build_og_model(og)
            self.type = "ort-genai"
            self.config = self.load_config(input_folder)
        self._inferos = runtime

    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = getattr(self, "_inferos", None)
        if runtime is None:
            return orig_generate(self, *args, **kwargs)
        bound = gen_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self")
        return runtime.generate(self, orig_generate, call)

    __init__.__doc__ = orig_init.__doc__
    generate.__doc__ = orig_generate.__doc__
    generate.__signature__ = gen_sig  # type: ignore[attr-defined]
    setattr(cls, _PATCH_ATTR, (orig_init, orig_generate))
    cls.__init__ = __init__
    cls.generate = generate
    log.info("lemonade-inferos: OrtGenaiModel patched (per-request policy, hooks, KV store)")
    return True


def unpatch_oga_utils(module: Any) -> bool:
    """Restore the original ``OrtGenaiModel`` methods. Returns False when not patched."""
    cls = module.OrtGenaiModel
    orig = cls.__dict__.get(_PATCH_ATTR)
    if orig is None:
        return False
    cls.__init__, cls.generate = orig
    delattr(cls, _PATCH_ATTR)
    return True


def _truthy(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    return default if raw is None or not raw.strip() else raw.strip().lower() in _TRUTHY


def engine_support(folder: str | Path) -> tuple[bool, str]:
    """Whether the inferos engine (and so its KV store) can run ``folder``.

    Returns:
        ``(True, "")`` or ``(False, reason)``; the reason ends up in the request stats.
    """
    from ..model.spec import DecoderSpec, ModelFolderError

    if not _truthy(ENGINE_ENV, True):
        return False, f"{ENGINE_ENV}=0"
    try:
        spec = DecoderSpec.from_folder(folder)
    except ModelFolderError as e:
        return False, str(e)
    if "%d" not in spec.past_key_name or "%d" not in spec.present_key_name:
        return False, "decoder has no per-layer past/present KV inputs"
    if not spec.model_path.is_file():
        return False, f"{spec.model_path.name} not found in the folder"
    try:
        from ..engine import Engine  # noqa: F401
    except ImportError as e:
        return False, f"inferos engine unavailable ({e})"
    return True, ""


class _RecordingStreamer:
    """Stands in for Lemonade's ``OrtGenaiStreamer`` to time each token, forwarding all."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.count = 0
        self.first_at: float | None = None
        self.last_at: float | None = None

    def add_text(self, text: str) -> None:
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.count += 1
        self._inner.add_text(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _stop_event(stopping_criteria: Any) -> threading.Event | None:
    """Lemonade passes ``[StopOnEvent(server.stop_event)]``: return that event."""
    for crit in stopping_criteria or ():
        ev = getattr(crit, "stop_event", None)
        if isinstance(ev, threading.Event):
            return ev
    return None


class LemonadeRuntime:
    """What inferos keeps for one ``OrtGenaiModel``: plugin manager, policy, engine.

    Args:
        folder: the model folder Lemonade loads.

    Raises:
        lemonade_inferos.policy.PolicyError: ``INFEROS_POLICY`` names an unknown preset or an
            invalid file.
        ImportError: a plugin in ``INFEROS_PLUGINS`` cannot be imported.
    """

    def __init__(self, folder: str):
        from ..host import host_plugin_manager
        from ..policy import load_policy

        self.folder = str(Path(folder).expanduser().resolve())
        self.manager = host_plugin_manager()  # with the agent client when INFEROS_AGENT_URL is set
        self.policy = load_policy(os.environ.get(POLICY_ENV) or None)
        self.load_notes: list[str] = []
        self.engine: Any = None
        ok, reason = engine_support(self.folder)
        if ok:
            try:
                from ..engine import Engine

                engine = Engine(self.folder, pm=self.manager, policy=self.policy, backend="auto")
                if engine.backend == "ort":
                    self.engine = engine
                else:
                    reason = "decoder graph has no explicit past/present KV inputs"
            except Exception as e:  # noqa: BLE001 - fall back to Lemonade's own loop
                reason = f"inferos engine failed to open the model ({type(e).__name__}: {e})"
                log.warning("lemonade-inferos: %s; using onnxruntime-genai", reason)
        self.kv_inactive_reason = "" if self.engine is not None else reason
        log.info("lemonade-inferos: %s -> %s", self.folder,
                 "inferos engine + KV store" if self.engine is not None
                 else f"onnxruntime-genai (KV store not active: {reason})")

    # -- load --------------------------------------------------------------------------
    def build_og_model(self, og: Any) -> Any:
        """``og.Model`` from ``og.Config(folder)`` with the policy's session/provider
        options overlaid. If the overlay is rejected, loads with the folder's own settings
        and records why in the stats notes.
        """
        from ..ort_options import genai_overlay

        config = og.Config(self.folder)
        overlay = genai_overlay(self.policy)
        try:
            config.overlay(json.dumps(overlay))
            return og.Model(config)
        except Exception as e:  # noqa: BLE001
            note = f"policy overlay rejected by onnxruntime-genai ({e}); folder defaults used"
            log.warning("lemonade-inferos: %s", note)
            self.load_notes.append(note)
            return og.Model(og.Config(self.folder))

    # -- requests ----------------------------------------------------------------------
    def _context(self, prompt_tokens: int, max_new_tokens: int) -> Any:
        from ..types import InferenceContext

        return InferenceContext(model=self.folder, prompt_tokens=prompt_tokens,
                                max_new_tokens=max_new_tokens, host="lemonade")

    def generate(self, model: Any, orig_generate: Callable[..., Any], call: dict[str, Any]) -> Any:
        """Run one ``OrtGenaiModel.generate`` call (already bound to its parameters)."""
        input_ids = [int(t) for t in call["input_ids"]]
        max_new = call.get("max_new_tokens") or 512
        if call.get("max_length"):
            max_new = max(1, int(call["max_length"]) - len(input_ids))
        context = self._context(len(input_ids), int(max_new))
        if self.engine is not None:
            return self._generate_engine(model, input_ids, call, context)
        return self._generate_oga(model, orig_generate, call, context)

    def _generate_engine(self, model: Any, input_ids: list[int], call: dict[str, Any], context: Any) -> Any:
        from ..engine import GenerationConfig

        streamer = call.get("streamer")
        cfg = _generation_config(GenerationConfig, call, context.max_new_tokens, model.config)
        cancel = _stop_event(call.get("stopping_criteria")) or threading.Event()
        # One streamer item per generated token: Lemonade counts items as output_tokens.
        # No stop strings go to the engine (Lemonade applies them to the streamed text), so
        # the engine never holds text back nor sends its end-of-text flush (token id -1).
        on_token = (lambda _tid, text: streamer.add_text(text)) if streamer is not None else None
        model.prompt_tokens = len(input_ids)
        try:
            res = self.engine.generate(input_ids, cfg, on_token=on_token, context=context, cancel=cancel)
        finally:
            if streamer is not None:
                streamer.done()
        st = res.stats
        model.response_tokens = len(res.token_ids)
        model.time_to_first_token = (st.ttft_ms or 0.0) / 1000.0
        model.tokens_per_second = st.decode_tps
        if streamer is None:
            import numpy as np

            return [np.asarray(input_ids + list(res.token_ids), dtype=np.int32)]
        return None

    def _generate_oga(self, model: Any, orig_generate: Callable[..., Any], call: dict[str, Any], context: Any) -> Any:
        from ..sysinfo import peak_rss_bytes
        from ..types import KVStats, RunStats

        policy = self.manager.before_request(context=context, policy=self.policy)
        notes = list(self.load_notes)
        if self.kv_inactive_reason:
            notes.append(f"inferos KV store not active for this model: {self.kv_inactive_reason}")
        if policy.session_key() != self.policy.session_key():
            notes.append("session-affecting policy fields apply at model load only on onnxruntime-genai")
        cap = _kv_budget_tokens(policy, self.folder)
        if cap is not None and context.prompt_tokens + context.max_new_tokens > cap:
            allowed = max(1, cap - context.prompt_tokens)
            notes.append(f"max_new_tokens {context.max_new_tokens} -> {allowed} (kv.budget_bytes)")
            call["max_new_tokens"], call["max_length"] = allowed, None
        stats = RunStats(request_id=context.request_id, model=self.folder,
                         prompt_tokens=context.prompt_tokens, policy_name=policy.name,
                         backend="onnxruntime-genai", notes=notes,
                         kv=KVStats(store="onnxruntime-genai", active=False))
        recorder = None
        if call.get("streamer") is not None:
            recorder = call["streamer"] = _RecordingStreamer(call["streamer"])
        t0 = time.perf_counter()
        try:
            out = orig_generate(model, **call)
        except BaseException as e:
            self.manager.on_request_error(context=context, error=e)
            raise
        t_end = time.perf_counter()
        if recorder is not None:
            n, first, last = recorder.count, recorder.first_at, recorder.last_at
            finish = "cancelled" if (ev := _stop_event(call.get("stopping_criteria"))) and ev.is_set() else ""
        else:
            n = int(model.response_tokens or 0)
            first = t0 + (model.time_to_first_token or 0.0)
            last, finish = t_end, ""
        stats.generated_tokens = n
        stats.finish_reason = finish or ("length" if n >= context.max_new_tokens else "stop")
        stats.ttft_ms = (first - t0) * 1000.0 if first is not None else None
        stats.prefill_ms = stats.ttft_ms or 0.0
        stats.decode_ms = ((last - first) * 1000.0) if first is not None and last is not None else 0.0
        stats.decode_tps = (n - 1) / (stats.decode_ms / 1000.0) if n > 1 and stats.decode_ms > 0 else 0.0
        stats.total_ms = (t_end - t0) * 1000.0
        stats.end_time = time.time()
        stats.peak_rss_bytes = peak_rss_bytes()
        self.manager.after_request(context=context, stats=stats)
        return out


def _generation_config(cls: Any, call: dict[str, Any], max_new: int, model_config: Any) -> Any:
    """Lemonade's sampling arguments → ``GenerationConfig`` with Lemonade's precedence
    (request > genai_config.json ``search`` > Lemonade defaults 50 / 1.0 / 0.7 / 1.0)."""
    search = (model_config or {}).get("search", {}) or {}

    def pick(arg: str, key: str, default: Any) -> Any:
        v = call.get(arg)
        return v if v is not None else search.get(key, default)

    do_sample = search.get("do_sample", call.get("do_sample", True))
    seed = call.get("random_seed")
    return cls(
        max_new_tokens=int(max_new),
        temperature=float(pick("temperature", "temperature", 0.7)) if do_sample else 0.0,
        top_k=int(pick("top_k", "top_k", 50)),
        top_p=float(pick("top_p", "top_p", 1.0)),
        repetition_penalty=float(pick("repeat_penalty", "repetition_penalty", 1.0)),
        seed=None if seed is None or seed < 0 else int(seed),
    )


def _kv_budget_tokens(policy: Any, folder: str) -> int | None:
    """Tokens that fit ``policy.kv.budget_bytes`` at float32 K/V, or None (no budget or
    unknown model shape)."""
    if not policy.kv.budget_bytes:
        return None
    try:
        from ..model.spec import DecoderSpec

        per_token = DecoderSpec.from_folder(folder).kv_bytes_per_token(4)
    except Exception:  # noqa: BLE001 - a folder inferos cannot describe gets no cap
        return None
    return int(policy.kv.budget_bytes // per_token) if per_token else None


# ---------------------------------------------------------------------------------------
# Launching Lemonade and installing the .pth hook
# ---------------------------------------------------------------------------------------
def _python_of(executable: Path) -> str | None:
    """The interpreter a console script runs with (its shebang), or None."""
    try:
        with open(executable, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    return parts[0] if parts and Path(parts[0]).name.startswith("python") else None


def find_lemonade_server() -> Path:
    """Locate ``lemonade-server-dev``.

    Order: ``INFEROS_LEMONADE_SERVER``; the ``bin``/``Scripts`` folder of
    ``INFEROS_LEMONADE_PYTHON``; ``PATH``.

    Raises:
        LemonadeNotInstalled: not found (the message holds the install commands).
    """
    names = ["lemonade-server-dev", "lemonade-server-dev.exe"]
    candidates: list[Path] = []
    if os.environ.get(SERVER_ENV):
        candidates.append(Path(os.environ[SERVER_ENV]))
    if os.environ.get(PYTHON_ENV):
        candidates += [Path(os.environ[PYTHON_ENV]).parent / n for n in names]
    found = shutil.which("lemonade-server-dev")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise LemonadeNotInstalled(INSTALL_HINT)


def site_packages(python: str) -> Path:
    """The ``purelib`` site-packages folder of interpreter ``python``.

    Raises:
        RuntimeError: ``python`` cannot be run.
    """
    try:
        out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot run {python!r} to find its site-packages: {e}") from e
    return Path(out.stdout.strip())


def hook_installed(python: str) -> bool:
    """Whether ``lemonade_inferos.pth`` is present in ``python``'s site-packages."""
    try:
        return (site_packages(python) / PTH_FILENAME).is_file()
    except RuntimeError:
        return False


def install_pth(python: str | None = None) -> Path:
    """Write ``lemonade_inferos.pth`` into the site-packages of ``python``.

    The file is inert unless ``INFEROS_ENABLED`` is set in a process's environment.

    Args:
        python: interpreter of the Lemonade environment (default: this one).

    Returns:
        The path written.

    Raises:
        RuntimeError: ``python`` cannot import ``lemonade_inferos`` (the message says how to
            install it there) or its site-packages is not writable.
    """
    python = python or sys.executable
    probe = subprocess.run([python, "-c", "import lemonade_inferos.integrations._pth_loader"],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "INFEROS_ENABLED": "0"})
    if probe.returncode != 0:
        raise RuntimeError(
            f"{python} cannot import lemonade_inferos; install it there instead (its wheel ships "
            f"the hook, so install-hook is then not needed): {python} -m pip install "
            f"<lemonade-inferos, or a checkout's path>\n{probe.stderr.strip()[-500:]}")
    target = site_packages(python) / PTH_FILENAME
    try:
        target.write_text(PTH_LINE, encoding="utf-8")
    except OSError as e:
        raise RuntimeError(f"cannot write {target}: {e}") from e
    return target


def run_lemonade(argv: list[str]) -> int:
    """Run ``lemonade-server-dev *argv`` with the inferos integration enabled.

    Sets ``INFEROS_ENABLED=1`` for the child, checks that the ``.pth`` hook is installed in
    Lemonade's interpreter, then runs Lemonade in the foreground and returns its exit code
    (Ctrl-C is passed on to Lemonade, which shuts down cleanly).

    Args:
        argv: Lemonade's arguments, e.g. ``["serve", "--port", "8000"]``.

    Returns:
        Lemonade's exit code; 127 when Lemonade is not installed and 2 when the hook is
        missing (both with an explanation on stderr).
    """
    try:
        exe = find_lemonade_server()
    except LemonadeNotInstalled as e:
        print(f"inferos: {e}", file=sys.stderr)
        return 127
    python = _python_of(exe)
    if python and not hook_installed(python):
        print(f"inferos: the lemonade-inferos hook is not installed in {python}, so Lemonade would "
              f"run without it. Install lemonade-inferos there (its wheel ships the hook):\n"
              f"    {python} -m pip install <lemonade-inferos, or a checkout's path>\n"
              f"or, if lemonade_inferos is importable there without being installed:\n"
              f"    {python} -m lemonade_inferos.integrations.lemonade install-hook", file=sys.stderr)
        return 2
    env = {**os.environ, "INFEROS_ENABLED": "1"}
    proc = subprocess.Popen([str(exe), *argv], env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # the child got the same SIGINT; wait for its clean shutdown


def main(argv: list[str] | None = None) -> int:
    """``python -m lemonade_inferos.integrations.lemonade install-hook [--python P] | serve ...``.

    ``install-hook`` writes ``lemonade_inferos.pth`` into the site-packages of ``P`` (default:
    this interpreter); only needed where lemonade-inferos is not pip-installed, since its
    wheel ships the file. Any other arguments run ``lemonade-server-dev`` with
    ``INFEROS_ENABLED=1``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(inspect.cleandoc(main.__doc__ or ""))
        return 0
    if args[:1] == ["install-hook"]:
        python = args[args.index("--python") + 1] if "--python" in args else None
        try:
            print(f"installed {install_pth(python)}")
        except RuntimeError as e:
            print(f"inferos: {e}", file=sys.stderr)
            return 1
        return 0
    if args:
        return run_lemonade(args)
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
