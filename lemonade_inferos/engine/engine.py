"""The generation loop the hooks wrap: prefill, then decode step by step on one ORT session.

One request::

    context  = InferenceContext(...)                    # what the host knows
    policy   = hooks.before_request(context, policy)    # PreRun
    session  = cached InferenceSession(graph of the KV store, SessionOptions from hooks)
    cache    = hooks.kv_cache(policy, spec, context)    # full precision or tiered quantized
    prefill  : run(prompt ids)                          -> logits, cache.update(...)
    decode   : run(one id) per step (IOBinding)         -> logits, cache.update(...)
    hooks.after_request(context, stats)                 # PostRun (or on_request_error)

Prefill runs in chunks of ``policy.runtime.prefill_chunk_tokens`` tokens (each run's
attention scores are ``[heads, chunk, past + chunk]``, never ``[heads, T, T]``). The prompt's
negative log-likelihood (a log-softmax over every prompt row) is not on the path to the first
token: each chunk's rows are scored on a worker thread while the next chunk runs, and the
result is collected after the first token was handed out.

Timing: TTFT is taken when the first generated token is handed to the caller's ``on_token``
callback (after prefill, sampling and detokenization), decode tokens/s over the remaining
tokens, peak RSS from ``getrusage`` (process lifetime peak, bytes).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnxruntime as ort

from ..kv.base import KVCache
from ..resources.lru import LRUCache
from ..runtime.providers import ProviderFailover
from ..model.spec import DecoderSpec, ModelFolderError
from ..plugins import InferosManager, NoopManager, get_plugin_manager
from ..ort_options import prime_run_options
from ..policy import Policy, baseline_policy, load_policy
from ..sysinfo import peak_rss_bytes
from ..types import InferenceContext, KVStats, RunStats, prompt_fingerprint
from .prefix_cache import PrefixCache, TailLogits, prefix_cache_bytes_from_env
from .prompt_nll import PromptNLL
from .sampling import GenerationConfig, select_token
from .text import IncrementalDetokenizer, StopStream, TextCodec

if TYPE_CHECKING:  # pragma: no cover
    from ..guard import QualityGuard
    from ..resources.manager import ResourceManager

log = logging.getLogger("lemonade_inferos.engine")

OnToken = Callable[[int, str], "bool | None"]


def _first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (onnxruntime messages can span pages)."""
    text = " ".join(str(e).split())[:limit]
    return text or type(e).__name__


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context window."""


@dataclass
class GenerationResult:
    """What :meth:`Engine.generate` returns."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length", "cancelled", "deadline"
    stats: RunStats
    policy: Policy | None = None
    step_logits: list[np.ndarray] = field(default_factory=list, repr=False)


class _Binding:
    """The IOBinding of one (request cache, session) pair and what is bound in it.

    Inputs are rebound only when a different object is passed (the binding reads numpy
    arrays in place, so a C-contiguous array updated in place needs no rebinding);
    outputs are rebound when their buffer object changes or they go back to
    onnxruntime-allocated memory. ``logits`` is a ``[1, 1, vocab]`` float32 buffer for
    one-token runs (decode), bound once.
    """

    __slots__ = ("sess", "io", "inputs", "outputs", "logits")

    def __init__(self, sess: ort.InferenceSession, vocab_size: int):
        self.sess = sess
        self.io = sess.io_binding()
        self.inputs: dict[str, object] = {}
        self.outputs: dict[str, object] = {}
        self.logits = np.empty((1, 1, vocab_size), np.float32)

    def bind_input(self, name: str, v: object) -> None:
        if self.inputs.get(name) is v and (not isinstance(v, np.ndarray) or v.flags.c_contiguous):
            return
        if isinstance(v, np.ndarray):
            self.io.bind_cpu_input(name, v)
        else:
            self.io.bind_ortvalue_input(name, v)
        self.inputs[name] = v

    def bind_output(self, name: str, buf: np.ndarray | None) -> None:
        if buf is None:  # onnxruntime-allocated: bound anew every run (shapes change)
            self.io.bind_output(name, "cpu")
            self.outputs[name] = None
            return
        if self.outputs.get(name) is buf:
            return
        self.io.bind_output(name, "cpu", 0, buf.dtype.type, buf.shape, buf.ctypes.data)
        self.outputs[name] = buf


class Engine:
    """Runs one model folder; thread-safe for concurrent requests (one KV cache each).

    Args:
        model_dir: a model folder (see :mod:`lemonade_inferos.model.spec`); None = the
            embedded stories260K model, converted on first use.
        pm: plugin manager; None builds one with :func:`get_plugin_manager`.
        policy: the policy in force when no plugin overrides it; None = ``default`` preset.
        backend: ``"ort"`` (inferos' own loop with KV access), ``"oga"``
            (onnxruntime-genai ``og.Generator``; no KV access) or ``"auto"`` (ort when the
            folder's decoder has explicit past/present I/O, else oga).
        resources: a :class:`~lemonade_inferos.resources.manager.ResourceManager`; when set,
            each request reserves its KV bytes before prefill (may be tightened, queued, or
            refused with :class:`~lemonade_inferos.resources.budget.BudgetExceeded`).
        max_sessions: ORT sessions kept (least recently used beyond that are dropped).
        prefix_cache_bytes: byte limit of the prefix cache (:attr:`prefix_cache`, KV states
            of earlier requests reused by later ones with the same prefix); 0 = off; None =
            ``INFEROS_PREFIX_CACHE_BYTES`` or 512 MiB.

    Raises:
        ModelFolderError: the folder is missing or unusable.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        pm: InferosManager | None = None,
        policy: Policy | None = None,
        backend: str = "auto",
        resources: "ResourceManager | None" = None,
        max_sessions: int = 8,
        prefix_cache_bytes: int | None = None,
    ):
        if model_dir is None:
            from ..model.embedded import embedded_model_dir

            model_dir = embedded_model_dir()
        self.spec = DecoderSpec.from_folder(model_dir)
        self.codec = TextCodec(self.spec)
        self.pm = pm if pm is not None else get_plugin_manager()
        self.policy = policy if policy is not None else load_policy("default")
        if backend not in ("auto", "ort", "oga"):
            raise ValueError(f"backend={backend!r} is not allowed; must be 'auto', 'ort' or 'oga'")
        self.backend = self._detect_backend() if backend == "auto" else backend
        self._sessions: LRUCache[ort.InferenceSession] = LRUCache(max_sessions)
        self.resources = resources
        self.failover = ProviderFailover()
        if resources is not None:
            resources.register_cache(self._sessions)
        self._oga_models: dict[str, object] = {}
        self._lock = threading.Lock()
        self._calib: list[int] | None = None
        self._guard: "QualityGuard | None" = None
        self._mask = np.ones((1, self.spec.context_length + 1), dtype=np.int64)
        self._bindings: "weakref.WeakKeyDictionary[KVCache, tuple]" = weakref.WeakKeyDictionary()
        self.prefix_cache = PrefixCache(prefix_cache_bytes_from_env() if prefix_cache_bytes is None else prefix_cache_bytes)

    # -- sessions -----------------------------------------------------------------------
    def _detect_backend(self) -> str:
        if not self.spec.model_path.is_file():
            return "oga"
        try:
            import onnx

            m = onnx.load(str(self.spec.model_path), load_external_data=False)
            names = {i.name for i in m.graph.input}
        except Exception:  # unreadable by onnx: leave it to onnxruntime-genai
            return "oga"
        want = {self.spec.past_key_name % 0, self.spec.past_value_name % 0, "input_ids", "attention_mask"}
        return "ort" if want <= names else "oga"

    def session(self, graph_file: str, policy: Policy, pm: InferosManager | None = None) -> ort.InferenceSession:
        """The cached ``InferenceSession`` for ``graph_file`` under ``policy``.

        Sessions are keyed by graph file and :meth:`Policy.session_key`, so requests whose
        policies differ only in per-request fields share one session.
        """
        pm = pm or self.pm
        excluded = self.failover.excluded()
        key = (graph_file, policy.session_key(), pm.enabled, excluded)
        sess = self._sessions.get(key)
        if sess is not None:
            return sess
        with self._lock:
            sess = self._sessions.get(key)
            if sess is None:
                path = self.spec.folder / graph_file
                if not path.is_file():
                    raise ModelFolderError(f"{str(self.spec.folder)!r} has no {graph_file}")
                so = pm.session_options(policy, self.spec)
                providers = pm.execution_providers(policy, self.failover.available(ort.get_available_providers()))
                sess = self.failover.create(str(path), so, [(p, o) for p, o in providers if p not in excluded])
                self._sessions[key] = sess
        return sess

    # -- one model run ------------------------------------------------------------------
    def _run(
        self,
        sess: ort.InferenceSession,
        cache: KVCache,
        ids: np.ndarray,
        start_pos: int,
        ro: ort.RunOptions,
        iobinding: bool,
    ) -> np.ndarray:
        """Run ``ids`` [1, n] int64 at logical positions ``start_pos..start_pos+n-1``.

        Returns logits float32 [n, vocab]; hands the cache its outputs.
        """
        n = ids.shape[1]
        mask = cache.attention_mask(n)
        if mask is None:
            total = cache.past_length + n
            if total > self._mask.shape[1]:
                self._mask = np.ones((1, total), dtype=np.int64)
            mask = self._mask[:, :total]
        pos = np.arange(start_pos, start_pos + n, dtype=np.int64)[None, :]
        outs = cache.output_names()
        if iobinding:
            # one IOBinding per (request cache, session): inputs and output buffers that are
            # the same objects as in the last run stay bound (the binding is zero-copy, so
            # arrays updated in place need no rebinding)
            st = self._bindings.get(cache)
            if st is None or st.sess is not sess:
                st = _Binding(sess, self.spec.vocab_size)
                self._bindings[cache] = st
                past = cache.past_inputs()
            else:
                past = cache.step_inputs()
            st.bind_input("input_ids", ids)
            st.bind_input("attention_mask", mask)
            st.bind_input("position_ids", pos)
            for name, v in past.items():
                st.bind_input(name, v)
            # the outputs the cache has buffers for (KVCache.output_buffers) and one-token
            # logits are written in place; the others get fresh buffers from onnxruntime
            bufs = cache.output_buffers(n) or {}
            logits_buf = st.logits if n == 1 else None
            st.bind_output("logits", logits_buf)
            for name in outs:
                st.bind_output(name, bufs.get(name))
            sess.run_with_iobinding(st.io, ro)
            got: dict[str, object] = {name: bufs[name] for name in outs if name in bufs}
            if logits_buf is not None and len(got) == len(outs):
                logits = logits_buf[0].copy()
            else:
                vals = st.io.get_outputs()
                logits = logits_buf[0].copy() if logits_buf is not None else vals[0].numpy()[0]
                for name, v in zip(outs, vals[1:]):
                    got.setdefault(name, v)
            cache.update({name: got[name] for name in outs}, n)
        else:
            self._bindings.pop(cache, None)  # past_inputs() below resets step_inputs() tracking
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
            feeds.update({k: (v if isinstance(v, np.ndarray) else v.numpy()) for k, v in cache.past_inputs().items()})
            vals = sess.run(["logits", *outs], feeds, ro)
            logits = vals[0][0]
            cache.update(dict(zip(outs, vals[1:])), n)
        return logits

    def _after_run_failure(self, sess, error, cache, ro, policy, pm, stats):
        """A run on ``sess`` raised ``error``: the session without the failed provider (next
        in the chain), or ``error`` re-raised when it was CPU or a deadline stop."""
        if getattr(ro, "terminate", False) or not self.failover.run_failed(sess, error):
            raise error
        failed = sess.get_providers()[0]
        sess = self.session(cache.graph_file, policy, pm)
        stats.provider = sess.get_providers()[0]
        stats.notes.append(f"provider {failed} failed during the run; continued on {stats.provider}")
        return sess

    def _run_failover(self, sess, cache, ids, start_pos, ro, iob, policy, pm, stats):
        """:meth:`_run`; when the session's provider fails during the run, the same step runs
        again on a session without it (next provider in the chain). Returns (session, logits)."""
        try:
            return sess, self._run(sess, cache, ids, start_pos, ro, iob)
        except Exception as e:
            sess = self._after_run_failure(sess, e, cache, ro, policy, pm, stats)
            return sess, self._run(sess, cache, ids, start_pos, ro, iob)

    # -- public API ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def generate(
        self,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        *,
        on_token: OnToken | None = None,
        context: InferenceContext | None = None,
        cancel: threading.Event | None = None,
        baseline: bool = False,
        policy: Policy | None = None,
    ) -> GenerationResult:
        """Generate a continuation of ``prompt`` (text, or token ids incl. BOS).

        Args:
            config: generation settings (validated); default greedy, 128 tokens.
            on_token: called as ``on_token(token_id, text_piece)`` for each generated token
                as soon as it exists; returning ``False`` stops generation ("cancelled").
                Text that may be the start of a stop string is held back until resolved;
                held-back text that never became a stop string is flushed at the end with
                one extra call ``on_token(-1, text)`` (token id -1 = no new token).
            context: the request context; built from the prompt when None.
            cancel: set it from another thread to stop generation ("cancelled").
            baseline: run with no plugins (ORT defaults, full-precision KV cache, no
                PostRun), the reference every comparison uses.
            policy: the policy in force for this request (default: the engine's).

        Raises:
            ContextLengthError: the prompt is longer than the model's context minus one.
            ValueError: a generation setting is out of range (names the field).
            Exceptions from onnxruntime propagate after ``on_request_error`` hooks ran.
        """
        cfg = (config or GenerationConfig()).validate()
        ids = self.codec.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        ctx_len = self.spec.context_length
        if len(ids) >= ctx_len:
            raise ContextLengthError(
                f"prompt has {len(ids)} tokens but the model's context is {ctx_len} tokens "
                f"(at most {ctx_len - 1} prompt tokens leave room for one generated token)"
            )
        if context is None:
            context = InferenceContext(
                model=self.spec.name, prompt_tokens=len(ids), max_new_tokens=cfg.max_new_tokens
            )
        pm: InferosManager = NoopManager() if baseline else self.pm
        base = baseline_policy() if baseline else (policy or self.policy)
        t0 = time.perf_counter()
        stats = RunStats(request_id=context.request_id, model=context.model, prompt_tokens=len(ids), baseline=baseline,
                         prompt_hash=prompt_fingerprint(ids))
        try:
            eff = pm.before_request(context, base)
            if eff.quality.guard and eff.kv.mode != "disabled" and self.backend == "ort":
                decision = self.quality_guard().decide(eff, context.quality_budget)
                eff = decision.policy
                context.extra.setdefault("notes", []).append(decision.note())
            stats.policy_name = eff.name
            if self.backend == "oga":
                return self._generate_oga(ids, cfg, eff, context, stats, on_token, cancel, pm, t0)
            if self.resources is None or baseline:
                return self._generate_ort(ids, cfg, eff, context, stats, on_token, cancel, pm, t0)
            admission = self.resources.admit(context, eff, self.spec)  # KV bytes reserved before prefill
            context.extra.setdefault("notes", []).append(admission.note)
            try:
                return self._generate_ort(ids, cfg, admission.policy, context, stats, on_token, cancel, pm, t0)
            finally:
                admission.release()
        except BaseException as e:
            pm.on_request_error(context, e)
            raise

    def _finish(self, stats: RunStats, context: InferenceContext, pm: InferosManager, t0: float, t_first: float | None, n_gen: int) -> None:
        t_end = time.perf_counter()
        stats.end_time = time.time()
        stats.generated_tokens = n_gen
        stats.total_ms = (t_end - t0) * 1e3
        if t_first is not None:
            stats.ttft_ms = (t_first - t0) * 1e3
            stats.decode_ms = (t_end - t_first) * 1e3
            if n_gen > 1 and t_end > t_first:
                stats.decode_tps = (n_gen - 1) / (t_end - t_first)
        stats.peak_rss_bytes = peak_rss_bytes()
        stats.notes.extend(context.extra.get("notes", []))
        if self.resources is not None:
            stats.resources = self.resources.report()
        pm.after_request(context, stats)

    def _generate_ort(self, ids, cfg, policy, context, stats, on_token, cancel, pm, t0) -> GenerationResult:
        cache = pm.kv_cache(policy, self.spec, context)
        if self.resources is not None:
            self.resources.track(context.request_id, cache)
        sess = self.session(cache.graph_file, policy, pm)
        ro = prime_run_options(pm.run_options(policy, context))
        iob = policy.io.enable_iobinding
        stats.provider = sess.get_providers()[0]
        rng = np.random.default_rng(cfg.seed)
        max_new = min(cfg.max_new_tokens, self.spec.context_length - len(ids))
        eos = set(self.spec.eos_token_ids) if cfg.stop_on_eos else set()
        stream = StopStream(IncrementalDetokenizer(self.codec, ids), cfg.stop)
        seen = np.array(ids, dtype=np.int64)
        out_ids: list[int] = []
        finish = "length"
        t_first = None

        deadline = self._arm_deadline(ro, context, t0)
        budget = policy.quality.max_delta_ppl if context.quality_budget is None else context.quality_budget
        reuse = self.prefix_cache.begin(ids, cache, budget_ppl=budget, max_kld=policy.quality.max_kld,
                                        enabled=context.cache_prompt and not stats.baseline)
        start = stats.cache_n = reuse.start
        if start:  # prompt_nll scores only ids[start + 1:]: not comparable with a full prefill's
            stats.prompt_hash = prompt_fingerprint([*ids, -1, start])
        nll = PromptNLL(ids)
        tail = self.prefix_cache.tail_logits(reuse, cache, nll)  # the last prompt rows, for its probe
        try:
            t_pre = time.perf_counter()
            run_from = start
            while True:  # a provider failing mid-prefill: the rest runs on the next provider
                try:
                    last = self._prefill(sess, cache, ids, run_from, ro, iob, policy.runtime.prefill_chunk_tokens, tail)
                    break
                except Exception as e:
                    sess = self._after_run_failure(sess, e, cache, ro, policy, pm, stats)
                    run_from = cache.seq_length
            stats.prefill_ms = (time.perf_counter() - t_pre) * 1e3
            self.prefix_cache.after_prefill(reuse, cache, ids, tail.rows)
            pos = len(ids)
            step_ids = np.zeros((1, 1), dtype=np.int64)
            while True:
                tok = select_token(last, cfg, seen, rng)
                if tok in eos:
                    finish = "stop"
                    break
                out_ids.append(tok)
                seen = np.append(seen, tok)
                piece, stopped = stream.add(tok)
                if t_first is None:
                    t_first = time.perf_counter()
                if on_token is not None and on_token(tok, piece) is False:
                    finish = "cancelled"
                    break
                if stopped:
                    finish = "stop"
                    break
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if deadline is not None and deadline.is_set():
                    finish = "deadline"
                    break
                if len(out_ids) >= max_new:
                    finish = "length"
                    break
                step_ids[0, 0] = tok
                sess, out = self._run_failover(sess, cache, step_ids, pos, ro, iob, policy, pm, stats)
                last = out[-1]
                pos += 1
        except Exception:
            if deadline is None or not deadline.is_set():
                raise
            finish = "deadline"  # RunOptions.terminate stopped the model run in flight
        finally:
            if deadline is not None:
                deadline.timer.cancel()  # type: ignore[attr-defined]
            stats.prompt_nll = nll.result()
        self._flush(stream, on_token, finish)
        stats.kv = cache.stats()
        stats.finish_reason = finish
        if finish != "deadline":  # a terminated run may have left the cache short of its tokens
            fed = ids + out_ids[: cache.seq_length - len(ids)]
            self.prefix_cache.store(reuse, cache, fed, len(ids), new_cache=lambda: pm.kv_cache(policy, self.spec, context),
                                    run=lambda c, x, p: self._run(sess, c, x, p, ro, False))
        stats.prefix_cache = self.prefix_cache.stats()
        if reuse.note:
            stats.notes.append(reuse.note)
        self._finish(stats, context, pm, t0, t_first, len(out_ids))
        return GenerationResult(text=stream.text, token_ids=out_ids, prompt_ids=list(ids), finish_reason=finish, stats=stats, policy=policy)

    def _prefill(self, sess: ort.InferenceSession, cache: KVCache, ids: list[int], start: int,
                 ro: ort.RunOptions, iob: bool, chunk: int, nll: "PromptNLL | TailLogits | None" = None) -> np.ndarray:
        """Run ``ids[start:]`` at positions ``start..`` in chunks of ``chunk`` tokens.

        Returns the float32 ``[vocab]`` logits after the last token; hands each chunk's
        logits rows to ``nll`` (scored off the critical path).
        """
        last = None
        for s0 in range(start, len(ids), chunk):
            piece = np.array([ids[s0:s0 + chunk]], dtype=np.int64)
            logits = self._run(sess, cache, piece, s0, ro, iob)
            if nll is not None:
                nll.add(logits, s0)
            last = logits[-1]
        assert last is not None, "prefill of an empty range"
        return last

    @staticmethod
    def _flush(stream: StopStream, on_token: OnToken | None, finish: str) -> None:
        """Hand ``on_token`` the text held back for a stop string that never came."""
        rest = stream.rest()
        if on_token is not None and rest and finish not in ("cancelled", "deadline"):
            on_token(-1, rest)

    @staticmethod
    def _arm_deadline(ro: ort.RunOptions, context: InferenceContext, t0: float) -> threading.Event | None:
        """Start a timer that sets ``ro.terminate`` when ``context.deadline_ms`` (counted
        from ``t0``, the request start) runs out; returns the event it sets (with the timer
        as ``.timer``), or None without a deadline."""
        if context.deadline_ms is None:
            return None
        ev = threading.Event()

        def fire() -> None:
            ev.set()
            ro.terminate = True

        remaining = context.deadline_ms / 1e3 - (time.perf_counter() - t0)
        timer = threading.Timer(max(0.0, remaining), fire)
        timer.daemon = True
        ev.timer = timer  # type: ignore[attr-defined]
        timer.start()
        return ev

    def _oga_model(self, policy: Policy) -> object:
        import onnxruntime_genai as og

        from ..ort_options import genai_overlay

        overlay = json.dumps(genai_overlay(policy, ort.get_available_providers()))
        with self._lock:
            model = self._oga_models.get(overlay)
            if model is None:
                config = og.Config(str(self.spec.folder))
                config.overlay(overlay)
                model = og.Model(config)
                self._oga_models[overlay] = model
        return model

    def _generate_oga(self, ids, cfg, policy, context, stats, on_token, cancel, pm, t0) -> GenerationResult:
        """onnxruntime-genai path: ``og.Generator`` owns the KV cache (no inferos KV store)."""
        import onnxruntime_genai as og

        model = self._oga_model(policy)
        params = og.GeneratorParams(model)
        opts = dict(max_length=min(self.spec.context_length, len(ids) + cfg.max_new_tokens),
                    do_sample=cfg.temperature > 0, repetition_penalty=cfg.repetition_penalty)
        if cfg.temperature > 0:
            opts.update(temperature=cfg.temperature, top_k=cfg.top_k or self.spec.vocab_size, top_p=cfg.top_p)
            if cfg.seed is not None:
                opts["random_seed"] = int(cfg.seed)
        params.set_search_options(**opts)
        gen = og.Generator(model, params)
        t_pre = time.perf_counter()
        gen.append_tokens(ids)
        stats.prefill_ms = (time.perf_counter() - t_pre) * 1e3
        stream = StopStream(IncrementalDetokenizer(self.codec, ids), cfg.stop)
        out_ids: list[int] = []
        finish, t_first = "length", None
        eos = set(self.spec.eos_token_ids)
        while not gen.is_done():
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            if tok in eos:
                finish = "stop"
                break
            out_ids.append(tok)
            piece, stopped = stream.add(tok)
            if t_first is None:
                t_first = time.perf_counter()
            if on_token is not None and on_token(tok, piece) is False or (cancel is not None and cancel.is_set()):
                finish = "cancelled"
                break
            if stopped:
                finish = "stop"
                break
        self._flush(stream, on_token, finish)
        stats.backend = "oga"
        stats.kv = KVStats(tokens=len(ids) + len(out_ids), store="oga", active=False)
        stats.notes.append("KV store not active: onnxruntime-genai backend owns the KV cache")
        stats.finish_reason = finish
        self._finish(stats, context, pm, t0, t_first, len(out_ids))
        return GenerationResult(text=stream.text, token_ids=out_ids, prompt_ids=list(ids), finish_reason=finish, stats=stats, policy=policy)

    def preload(self, policy: Policy | None = None) -> None:
        """Load and check the model before serving: build the KV store ``policy`` asks for
        and the baseline one, create their sessions (or the onnxruntime-genai model) and run
        one token through each. No request hooks fire and nothing is reported.

        Raises:
            ModelFolderError: a graph file is missing, or onnxruntime / onnxruntime-genai
                cannot load or run it (message names the file and the reason).
            PolicyError: the policy's KV store does not fit this model (e.g.
                ``kv.budget_bytes`` below the model's minimum).
        """
        policy = policy or self.policy
        if self.backend == "oga":
            try:
                self._oga_model(policy)
            except Exception as e:
                raise ModelFolderError(f"model folder {str(self.spec.folder)!r}: onnxruntime-genai cannot load it "
                                       f"(corrupt or unsupported model file): {_first_line(e)}") from e
            return
        ctx = InferenceContext(model=self.spec.name, prompt_tokens=1, max_new_tokens=1, host="preload")
        bos = np.array([[self.spec.bos_token_id]], dtype=np.int64)
        for pm, pol in ((self.pm, policy), (NoopManager(), baseline_policy())):
            cache = pm.kv_cache(pol, self.spec, ctx)
            try:
                sess = self.session(cache.graph_file, pol, pm)
                self._run(sess, cache, bos, 0, prime_run_options(ort.RunOptions()), False)
            except ModelFolderError:
                raise
            except Exception as e:
                raise ModelFolderError(f"{str(self.spec.folder / cache.graph_file)!r}: onnxruntime cannot load or run "
                                       f"it (corrupt or unsupported model file): {_first_line(e)}") from e

    def calibration_ids(self) -> list[int]:
        """The quality guard's calibration text: the model's own sample from BOS (temperature
        1.0, seed 0, baseline cache, one context length), generated once per engine."""
        if self._calib is None:
            res = self.generate([self.spec.bos_token_id], GenerationConfig(
                max_new_tokens=self.spec.context_length - 1, temperature=1.0, seed=0, stop_on_eos=False), baseline=True)
            self._calib = [self.spec.bos_token_id, *res.token_ids]
        return self._calib

    def quality_guard(self) -> "QualityGuard":
        """The engine's :class:`~lemonade_inferos.guard.QualityGuard` (created on first use)."""
        if self._guard is None:
            from ..guard import QualityGuard
            from ..quality import evaluate_ids

            self._guard = QualityGuard(lambda pol: evaluate_ids(self, self.calibration_ids(), pol), key=str(self.spec.folder))
        return self._guard

    def teacher_forced_logits(self, ids: list[int], cache: KVCache, policy: Policy | None = None,
                              chunk: int = 1) -> np.ndarray:
        """Feed ``ids`` through ``cache`` (the real cached decode path), ``chunk`` tokens per run.

        With ``chunk=1`` every token reads all earlier tokens from the cache (the exact
        decode path). With ``chunk=k`` a token reads the earlier tokens of its own run at
        float32 (as prefill does) and everything before the run from the cache.

        Returns:
            float32 ``[len(ids), vocab]``: row ``i`` is the next-token logits after
            ``ids[:i+1]``, so row ``i`` scores ``ids[i+1]``.

        Raises:
            ContextLengthError: more ids than the model's context.
            ValueError: ``chunk < 1``.
        """
        if len(ids) > self.spec.context_length:
            raise ContextLengthError(f"{len(ids)} tokens exceed the model's context of {self.spec.context_length}")
        if chunk < 1:
            raise ValueError(f"chunk={chunk} must be >= 1")
        policy = policy or self.policy
        sess = self.session(cache.graph_file, policy)
        ro = prime_run_options(ort.RunOptions())
        out = np.empty((len(ids), self.spec.vocab_size), dtype=np.float32)
        step = np.zeros((1, 1), dtype=np.int64)
        for i in range(0, len(ids), chunk):
            if chunk == 1:
                step[0, 0] = ids[i]
                out[i] = self._run(sess, cache, step, i, ro, True)[-1]
            else:
                piece = np.array([ids[i:i + chunk]], dtype=np.int64)
                out[i:i + piece.shape[1]] = self._run(sess, cache, piece, i, ro, True)
        return out
