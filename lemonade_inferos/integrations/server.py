"""``inferos serve``: an OpenAI-compatible HTTP backend on the inferos engine.

It speaks the contract of Lemonade's ``ryzenai-server`` backend binary (``lemond`` v9.2+
starts ``ryzenai-server -m <model_dir> --port N --ctx-size N [--verbose]``, polls
``/health`` and forwards ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``),
the Lemonade ``/api/v1`` surface GAIA uses (``/health``, ``/stats``, ``/load``, ``/models``)
and the plain OpenAI API, so ``lemond``, GAIA and any OpenAI client can use it.

Endpoints (each under the prefixes ``""``, ``/v1``, ``/api/v1`` and ``/api/v0``):

====================  ======  ===============================================================
path                  method  what
====================  ======  ===============================================================
/health               GET     ``{"status": "ok", "model_loaded", "context_size", ...}``
/models               GET     the one served model (OpenAI list shape + Lemonade fields)
/models/{id}          GET     that model
/chat/completions     POST    OpenAI chat completions (``stream`` true/false)
/completions          POST    OpenAI legacy completions (``stream`` true/false)
/responses            POST    OpenAI Responses API, text only (``stream`` true/false)
/stats                GET     Lemonade's last-request stats: ``time_to_first_token`` (s),
                              ``tokens_per_second``, ``input_tokens``, ``output_tokens``,
                              ``decode_token_times`` (s per token after the first)
/load, /unload        POST    acknowledged: the model given to ``-m`` stays loaded
====================  ======  ===============================================================

Request fields
--------------
``model`` is accepted whatever it names (one model is served; responses name it).
Sampling: ``temperature`` [0, 2] (0 = greedy), ``top_p`` (0, 1], ``top_k`` >= 0,
``seed`` (integer), ``repetition_penalty`` (alias ``repeat_penalty``) >= 1 (CTRL penalty
over prompt and output), ``max_tokens`` / ``max_completion_tokens`` / (Responses)
``max_output_tokens`` >= 1, ``stop`` (string or list of up to 16 non-empty strings; the
text is cut before the first), ``ignore_eos`` (llama.cpp extension). Omitted sampling
fields take the model folder's ``genai_config.json`` ``search`` defaults, as
onnxruntime-genai does (``do_sample: false`` = greedy). Omitted ``max_tokens`` = the rest
of the context (capped by ``--max-tokens``); a ``max_tokens`` beyond the context is capped
to it (``finish_reason: "length"``). ``frequency_penalty`` / ``presence_penalty`` are
checked for OpenAI's range [-2, 2] and otherwise ignored (the engine has the CTRL
repetition penalty instead). Not supported, answered with 400: ``n`` > 1, ``logprobs``,
``tools``, ``logit_bias``, ``response_format`` other than text, ``suffix``, ``best_of`` > 1.
``cache_prompt`` (llama.cpp server extension, default true): false = do not reuse or keep
a cached KV state for this request (the whole prompt is prefilled). Unknown fields are
ignored.

Prefix cache: a request whose prompt starts with the tokens of an earlier request (a chat's
next turn, a shared system prompt) starts from that request's KV state and prefills only
the rest (:mod:`lemonade_inferos.engine.prefix_cache`; limit ``--prefix-cache-bytes``).

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400
``invalid_request_error`` names the field, the value and what is allowed; a prompt that
leaves no room in the context (``prompt_tokens >= ctx``) is 400 with code
``context_length_exceeded``.
Anything that goes wrong on the server's side (a plugin, the policy's KV store, the model)
is 500 ``server_error`` naming the cause, never a 400.

Request guard (:mod:`~lemonade_inferos.integrations.serve_guard`, shared with the agent):
``Host`` must be a loopback name, the bound address or an ``--allowed-host`` (421), bodies
over ``--max-body-bytes`` get 413, bodies must be ``application/json`` (415), JSON nested
deeper than 64 levels is 400. Parsing and tokenization run in worker threads. :func:`serve`
binds the port and loads and runs the model (:meth:`Engine.preload`) before it answers
``/health``.

Usage and timings
-----------------
Every response carries OpenAI ``usage`` (``prompt_tokens``, ``completion_tokens``,
``total_tokens``; the engine's counts) and a llama.cpp-style ``timings`` object, which is
what ``lemond`` turns into its ``/api/v1/stats`` and Prometheus metrics:

* ``prompt_n`` = prompt tokens prefilled by this request, ``cache_n`` = prompt tokens whose
  KV state came from the engine's prefix cache (llama.cpp's meaning: ``prompt_n +
  cache_n`` = ``usage.prompt_tokens``; also in ``usage.prompt_tokens_details.cached_tokens``);
* ``prompt_ms`` = time to first token (request start → first generated token; the first
  token comes out of the prompt pass, and lemond reads ``prompt_ms`` as TTFT);
* ``predicted_n`` = completion tokens; ``predicted_ms`` = the rest of the generation;
* ``predicted_per_second`` = ``(predicted_n - 1) / predicted_ms`` (tokens after the first,
  = the engine's ``RunStats.decode_tps``), ``prompt_per_second`` = ``prompt_n / prompt_ms``.

Streaming (SSE): chat/completions chunks in OpenAI's shape; the chunk with
``finish_reason`` also carries ``usage`` and ``timings`` (llama.cpp does the same); with
``stream_options.include_usage`` an extra last chunk with ``choices: []`` carries them
(OpenAI semantics); then ``data: [DONE]``. The Responses API streams its typed events
(``response.created`` … ``response.output_text.delta`` … ``response.completed``).

Concurrency and cancellation
----------------------------
Generation runs in worker threads, at most ``max_concurrency`` at a time (default 1, one
KV cache each). A request over the limit waits for a slot up to ``queue_timeout`` seconds
(default 300), then gets 503 ``server_busy`` with a ``Retry-After`` header (the OpenAI
client retries those by itself). A client that disconnects stops its generation: the
engine's cancel event is set, the run ends with ``finish_reason="cancelled"`` in its
PostRun stats, and its slot is freed.

Every request goes through the engine, so the hooks fire (PreRun policy, the KV store,
PostRun stats to the agent when ``INFEROS_AGENT_URL`` is set) with an
:class:`~lemonade_inferos.types.InferenceContext` of ``host="serve"``.
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from .serve_guard import off_loop

log = logging.getLogger("lemonade_inferos.serve")

PREFIXES = ("", "/v1", "/api/v1", "/api/v0")
DEFAULT_PORT = 8001
DEFAULT_QUEUE_TIMEOUT = 300.0
MAX_STOP_STRINGS = 16
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# -- errors ---------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` (OpenAI's error object)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, value: Any, allowed: str) -> APIError:
    r = repr(value)
    if len(r) > 80:
        r = r[:77] + "..."
    return APIError(400, f"{param}={r} is not allowed; must be {allowed}", param=param)


# -- field validation -----------------------------------------------------------------------
def _is_num(v: Any) -> bool:
    """A finite JSON number that fits a float (``10**400`` is an int JSON allows, not a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) < 1.7e308 if isinstance(v, int) else math.isfinite(v)


def _number(body: dict, name: str, lo: float | None, hi: float | None, allowed: str, *, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_num(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise _bad(name, v, allowed)
    return float(v)


def _integer(body: dict, name: str, lo: int | None, allowed: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo):
        raise _bad(name, v, allowed)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, v, "true or false")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if (not isinstance(v, list) or len(v) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) for s in v)):
        raise _bad("stop", v, f"a string or a list of at most {MAX_STOP_STRINGS} strings")
    return [s for s in v if s]  # OpenAI ignores empty stop strings


@dataclass
class SamplingDefaults:
    """Sampling settings used when a request omits them (from ``genai_config.json``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_model_dir(cls, folder: str | Path) -> "SamplingDefaults":
        try:
            search = json.loads((Path(folder) / "genai_config.json").read_text()).get("search", {})
        except (OSError, ValueError):
            return cls()
        rp = search.get("repetition_penalty", 1.0)
        rp = float(rp) if _is_num(rp) and rp >= 1 else 1.0
        if not search.get("do_sample", False):
            return cls(repetition_penalty=rp)
        t, p, k = search.get("temperature", 1.0), search.get("top_p", 1.0), search.get("top_k", 0)
        return cls(
            temperature=float(t) if _is_num(t) and 0 <= t <= 2 else 1.0,
            top_p=float(p) if _is_num(p) and 0 < p <= 1 else 1.0,
            top_k=int(k) if isinstance(k, int) and k >= 0 else 0,
            repetition_penalty=rp,
        )


def _unsupported(body: dict, name: str, ok: Callable[[Any], bool], allowed: str) -> None:
    if name in body and body[name] is not None and not ok(body[name]):
        raise APIError(400, f"{name}={body[name]!r} is not supported by this backend; allowed: {allowed}", param=name)


def parse_generation(body: dict, defaults: SamplingDefaults, *, max_tokens_field: tuple[str, ...]) -> tuple[Any, int | None]:
    """The request's :class:`~lemonade_inferos.engine.GenerationConfig` (``max_new_tokens``
    not yet capped) and the requested token limit (None = not given).

    Raises:
        APIError: 400 naming the field, the value and the allowed range.
    """
    from ..engine import GenerationConfig

    requested = None
    for name in max_tokens_field:
        v = _integer(body, name, 1, "an integer >= 1")
        if v is not None:
            requested = v
    temperature = _number(body, "temperature", 0, 2, "a number in [0, 2] (0 = greedy)")
    top_p = _number(body, "top_p", 0, 1, "a number in (0, 1]", lo_open=True)
    top_k = _integer(body, "top_k", 0, "an integer >= 0 (0 = off)")
    rp = None
    for name in ("repetition_penalty", "repeat_penalty"):
        v = _number(body, name, 1, None, "a number >= 1 (1 = off)")
        if v is not None:
            rp = v
    for name in ("frequency_penalty", "presence_penalty"):
        _number(body, name, -2, 2, "a number in [-2, 2]")
    seed = _integer(body, "seed", None, "an integer")
    _unsupported(body, "n", lambda v: v == 1, "1")
    _unsupported(body, "best_of", lambda v: v == 1, "1")
    _unsupported(body, "logprobs", lambda v: v is False or v == 0, "false / null")
    _unsupported(body, "top_logprobs", lambda v: v == 0, "0 / null")
    _unsupported(body, "logit_bias", lambda v: v == {}, "{} / null")
    _unsupported(body, "tools", lambda v: v == [], "[] / null (no tool calling)")
    _unsupported(body, "suffix", lambda v: v == "", "'' / null")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise APIError(400, f"response_format={rf!r} is not supported by this backend; allowed: {{'type': 'text'}} / null",
                       param="response_format")
    cfg = GenerationConfig(
        max_new_tokens=requested or 1,
        temperature=defaults.temperature if temperature is None else temperature,
        top_k=defaults.top_k if top_k is None else top_k,
        top_p=defaults.top_p if top_p is None else top_p,
        repetition_penalty=defaults.repetition_penalty if rp is None else rp,
        seed=None if seed is None else seed % (1 << 64),
        stop=_stop(body),
        stop_on_eos=not _bool(body, "ignore_eos"),
    )
    try:
        cfg.validate()
    except ValueError as e:  # defensive: the checks above cover the same ranges
        raise APIError(400, str(e)) from None
    return cfg, requested


# -- state ----------------------------------------------------------------------------------
@dataclass
class ServerOptions:
    """How :func:`create_app` serves (see the module docstring)."""

    model_id: str
    ctx_size: int
    max_concurrency: int = 1
    queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT
    max_tokens: int | None = None
    checkpoint: str = ""


@dataclass
class RequestRecord:
    """What the server keeps about a finished request (``app.state.inferos.history``)."""

    request_id: str
    endpoint: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    stats: Any = None
    error: str | None = None


class ServerState:
    """Shared state of one app: engine, template, limits, last stats, recent requests."""

    def __init__(self, engine: Any, options: ServerOptions, template: Any, defaults: SamplingDefaults):
        self.engine = engine
        self.options = options
        self.template = template
        self.defaults = defaults
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=options.max_concurrency,
                                                              thread_name_prefix="inferos-gen")
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: Any = None
        self.active = 0
        self.waiting = 0
        self.started = time.time()
        self.last_stats: dict[str, Any] = {}
        self.history: deque[RequestRecord] = deque(maxlen=64)
        self.durations: deque[float] = deque(maxlen=16)
        self.lock = threading.Lock()

    def semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.options.max_concurrency), loop
        return self._sem

    def retry_after(self) -> int:
        d = sorted(self.durations)
        return max(1, math.ceil(d[len(d) // 2])) if d else 1


# -- one generation -------------------------------------------------------------------------
class Job:
    """One engine run in a worker thread, feeding text pieces to the event loop."""

    def __init__(self, state: ServerState, ids: list[int], cfg: Any, context: Any, stream: bool):
        self.state, self.ids, self.cfg, self.context, self.stream = state, ids, cfg, context, stream
        self.cancel = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.token_times: list[float] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self.future: asyncio.Future | None = None
        self.t0 = time.perf_counter()

    def _put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel.set()

    def on_token(self, token_id: int, piece: str) -> bool | None:
        if token_id >= 0:
            self.token_times.append(time.perf_counter())
        if piece and self.stream:
            self._put(("piece", piece))
        return False if self.cancel.is_set() else None

    def _work(self) -> None:
        try:
            self.result = self.state.engine.generate(
                self.ids, self.cfg, on_token=self.on_token, context=self.context, cancel=self.cancel)
        except BaseException as e:  # reported to the client by the handler
            self.error = e
        finally:
            self._put(("done", None))

    def start(self) -> None:
        """Submit to the executor; the caller holds a semaphore slot, released when done."""
        sem = self.state.semaphore()
        self.state.active += 1

        def _done(_: Any) -> None:
            self.state.active -= 1
            self.state.durations.append(time.perf_counter() - self.t0)
            sem.release()
            self.state.history.append(self.record())

        self.future = self.loop.run_in_executor(self.state.executor, self._work)
        self.future.add_done_callback(_done)

    def record(self) -> RequestRecord:
        endpoint = self.context.extra.get("endpoint", "")
        if self.result is None:
            return RequestRecord(self.context.request_id, endpoint, self.stream, len(self.ids), 0, "error",
                                 error=repr(self.error))
        r = self.result
        return RequestRecord(r.stats.request_id, endpoint, self.stream, len(r.prompt_ids), len(r.token_ids),
                             r.finish_reason, stats=r.stats)

    async def wait(self, request: Any) -> None:
        """Wait for the run; a client disconnect cancels it."""
        assert self.future is not None
        try:
            while True:
                done, _ = await asyncio.wait({self.future}, timeout=0.25)
                if done:
                    return
                if await request.is_disconnected():
                    self.cancel.set()
        except asyncio.CancelledError:
            self.cancel.set()
            raise


def request_client(request: Any) -> str:
    """The quota client of a request: ``X-Inferos-Client``, else the bearer API key
    (hashed), else ``default`` (:func:`lemonade_inferos.resources.quotas.client_id`).

    Raises:
        APIError: 400 when the header is malformed.
    """
    from ..resources.quotas import client_id

    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    try:
        return client_id(request.headers.get("x-inferos-client"), key)
    except ValueError as e:
        raise APIError(400, str(e), param="X-Inferos-Client") from None


def usage_of(result: Any) -> dict[str, Any]:
    p, n = len(result.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
            "prompt_tokens_details": {"cached_tokens": result.stats.cache_n}}


def timings_of(result: Any) -> dict[str, Any]:
    """llama.cpp-style ``timings`` from a :class:`GenerationResult` (definitions in the
    module docstring)."""
    st = result.stats
    p, n = len(result.prompt_ids) - st.cache_n, len(result.token_ids)
    prompt_ms = st.ttft_ms if st.ttft_ms is not None else st.total_ms
    predicted_ms = max(0.0, st.total_ms - prompt_ms)
    return {
        "prompt_n": p,
        "prompt_ms": round(prompt_ms, 3),
        "prompt_per_token_ms": round(prompt_ms / p, 3) if p else 0.0,
        "prompt_per_second": round(p * 1e3 / prompt_ms, 3) if prompt_ms > 0 else 0.0,
        "predicted_n": n,
        "predicted_ms": round(predicted_ms, 3),
        "predicted_per_token_ms": round(predicted_ms / (n - 1), 3) if n > 1 else 0.0,
        "predicted_per_second": round((n - 1) * 1e3 / predicted_ms, 3) if n > 1 and predicted_ms > 0 else 0.0,
        "cache_n": st.cache_n,
    }


def inferos_info(result: Any) -> dict[str, Any]:
    """Extra ``inferos`` object in responses: request id, policy, KV store and bytes, and the
    engine's prefix cache after this request (bytes held / saved by sharing, entries, hit
    rate, evictions)."""
    st = result.stats
    return {
        "request_id": st.request_id, "policy": st.policy_name, "backend": st.backend,
        "finish_reason": result.finish_reason, "kv_store": st.kv.store, "kv_bytes": st.kv.total_bytes,
        "kv_compression_vs_fp16": round(st.kv.compression_vs_fp16, 4),
        "cache_n": st.cache_n,
        "prefix_cache": {k: v for k, v in st.prefix_cache.to_dict().items()
                         if k in ("bytes_held", "logical_bytes", "bytes_saved", "entries", "hit_rate", "evictions",
                                  "retokenize_mismatches", "quality_rejects")},
    }


def _finish_reason(result: Any) -> str:
    # a deadline cut the output short, like the token limit
    return "length" if result.finish_reason in ("length", "deadline") else "stop"


# -- response shapes ------------------------------------------------------------------------
class Shape:
    """How one endpoint renders a result, streamed or not."""

    sse_done = True  # send "data: [DONE]" at the end

    def __init__(self, rid: str, model: str, created: int, echo_prefix: str = "", include_usage: bool = False):
        self.rid, self.model, self.created, self.echo_prefix, self.include_usage = rid, model, created, echo_prefix, include_usage

    def start(self) -> list[dict]:
        return []

    def delta(self, piece: str) -> dict:
        raise NotImplementedError

    def end(self, result: Any) -> list[dict]:
        raise NotImplementedError

    def body(self, result: Any) -> dict:
        raise NotImplementedError

    @staticmethod
    def sse(ev: dict) -> str:
        return f"data: {json.dumps(ev, ensure_ascii=False)}\n\n"


class ChatShape(Shape):
    def _chunk(self, delta: dict, finish: str | None) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": _fingerprint(),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def start(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def delta(self, piece: str) -> dict:
        return self._chunk({"content": piece}, None)

    def end(self, result: Any) -> list[dict]:
        last = self._chunk({}, _finish_reason(result))
        last.update(usage=usage_of(result), timings=timings_of(result), inferos=inferos_info(result))
        out = [last]
        if self.include_usage:
            out.append({"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                        "system_fingerprint": _fingerprint(), "choices": [], "usage": usage_of(result),
                        "timings": timings_of(result)})
        return out

    def body(self, result: Any) -> dict:
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": _fingerprint(),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": _finish_reason(result)}],
                "usage": usage_of(result), "timings": timings_of(result), "inferos": inferos_info(result)}


class CompletionShape(Shape):
    def _chunk(self, text: str, finish: str | None) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": _fingerprint(),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def start(self) -> list[dict]:
        return [self._chunk(self.echo_prefix, None)] if self.echo_prefix else []

    def delta(self, piece: str) -> dict:
        return self._chunk(piece, None)

    def end(self, result: Any) -> list[dict]:
        last = self._chunk("", _finish_reason(result))
        last.update(usage=usage_of(result), timings=timings_of(result), inferos=inferos_info(result))
        out = [last]
        if self.include_usage:
            out.append({"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                        "choices": [], "usage": usage_of(result), "timings": timings_of(result)})
        return out

    def body(self, result: Any) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": _fingerprint(),
                "choices": [{"index": 0, "text": self.echo_prefix + result.text, "logprobs": None,
                             "finish_reason": _finish_reason(result)}],
                "usage": usage_of(result), "timings": timings_of(result), "inferos": inferos_info(result)}


class ResponsesShape(Shape):
    """OpenAI Responses API (text output only)."""

    sse_done = False

    def __init__(self, *a: Any, request: dict | None = None, **kw: Any):
        super().__init__(*a, **kw)
        self.req = request or {}
        self.msg_id = "msg_" + self.rid[len("resp_"):]
        self.seq = 0
        self.text = ""

    def _resp(self, status: str, result: Any = None) -> dict:
        out, usage, incomplete = [], None, None
        if result is not None:
            out = [self._item("completed", result.text)]
            u = usage_of(result)
            usage = {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": result.stats.cache_n},
                     "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": u["total_tokens"]}
            if result.finish_reason == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        body = {"id": self.rid, "object": "response", "created_at": self.created, "status": status,
                "error": None, "incomplete_details": incomplete, "instructions": self.req.get("instructions"),
                "max_output_tokens": self.req.get("max_output_tokens"), "model": self.model, "output": out,
                "parallel_tool_calls": False, "temperature": self.req.get("temperature"), "tool_choice": "auto",
                "tools": [], "top_p": self.req.get("top_p"), "usage": usage, "metadata": {}, "text": {"format": {"type": "text"}}}
        if result is not None:
            body["timings"] = timings_of(result)
            body["inferos"] = inferos_info(result)
        return body

    def _item(self, status: str, text: str | None) -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": content}

    def _ev(self, type_: str, **kw: Any) -> dict:
        self.seq += 1
        return {"type": type_, "sequence_number": self.seq - 1, **kw}

    def start(self) -> list[dict]:
        part = {"type": "output_text", "text": "", "annotations": []}
        return [self._ev("response.created", response=self._resp("in_progress")),
                self._ev("response.in_progress", response=self._resp("in_progress")),
                self._ev("response.output_item.added", output_index=0, item=self._item("in_progress", None)),
                self._ev("response.content_part.added", item_id=self.msg_id, output_index=0, content_index=0, part=part)]

    def delta(self, piece: str) -> dict:
        return self._ev("response.output_text.delta", item_id=self.msg_id, output_index=0, content_index=0, delta=piece)

    def end(self, result: Any) -> list[dict]:
        part = {"type": "output_text", "text": result.text, "annotations": []}
        final = self._resp("completed", result)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [self._ev("response.output_text.done", item_id=self.msg_id, output_index=0, content_index=0, text=result.text),
                self._ev("response.content_part.done", item_id=self.msg_id, output_index=0, content_index=0, part=part),
                self._ev("response.output_item.done", output_index=0, item=self._item("completed", result.text)),
                self._ev(kind, response=final)]

    def body(self, result: Any) -> dict:
        return self._resp("completed", result)

    @staticmethod
    def sse(ev: dict) -> str:
        return f"event: {ev['type']}\ndata: {json.dumps(ev, ensure_ascii=False)}\n\n"


def _fingerprint() -> str:
    from .. import __version__

    return f"inferos-{__version__}"


# -- request → prompt ids -------------------------------------------------------------------
def _responses_messages(body: dict) -> list[dict]:
    """Responses API ``input`` (+ ``instructions``) → chat messages."""
    inp = body.get("input")
    msgs: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions", instructions, "a string")
        msgs.append({"role": "system", "content": instructions})
    if isinstance(inp, str):
        msgs.append({"role": "user", "content": inp})
    elif isinstance(inp, list) and inp:
        for i, item in enumerate(inp):
            if not isinstance(item, dict) or item.get("type", "message") != "message" or "role" not in item:
                raise APIError(400, f"input[{i}] is not supported; this backend takes message items "
                               "({'role': ..., 'content': ...})", param=f"input[{i}]")
            content = item.get("content")
            if isinstance(content, list):
                parts = []
                for j, p in enumerate(content):
                    if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text"):
                        raise APIError(400, f"input[{i}].content[{j}] is not supported; text parts only",
                                       param=f"input[{i}].content[{j}]")
                    parts.append({"type": "text", "text": p.get("text")})
                content = parts
            msgs.append({"role": item["role"], "content": content})
    else:
        raise _bad("input", inp, "a string or a non-empty list of message items")
    return msgs


class App:
    """Route handlers bound to one :class:`ServerState` (kept out of the FastAPI closure so
    they are readable and testable)."""

    def __init__(self, state: ServerState):
        self.state = state

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    async def json_body(request: Any) -> dict:
        """The body as a JSON object, parsed off the event loop (400 if it is not one)."""
        from .serve_guard import parse_json_object

        raw = await request.body()
        try:
            return await off_loop(parse_json_object, raw)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        ctx = self.state.options.ctx_size
        if len(ids) >= ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, your {param} resulted in "
                f"{len(ids)} tokens, which leaves no room for a completion (at most {ctx - 1} prompt tokens). "
                "Please reduce the length of the " + param + ".",
                param=param, code="context_length_exceeded")
        return ids

    def prompt_ids(self, body: dict) -> tuple[list[int], str]:
        """``/completions`` ``prompt`` → (token ids, prompt text for ``echo``)."""
        p = body.get("prompt")
        eng = self.state.engine
        if isinstance(p, list) and len(p) == 1 and (isinstance(p[0], (str, list))):
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise _bad("prompt", p, "a non-empty string, a list of one string, or a list of token ids")
            return eng.codec.encode(p), p
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            vocab = eng.spec.vocab_size
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise _bad("prompt", bad[0], f"token ids in [0, {vocab - 1}]")
            return list(p), eng.codec.decode(p)
        if isinstance(p, list) and len(p) > 1:
            raise APIError(400, f"prompt: a batch of {len(p)} prompts is not supported; send one prompt per request",
                           param="prompt")
        raise _bad("prompt", p, "a non-empty string, a list of one string, or a list of token ids")

    def chat_ids(self, messages: Any, param: str = "messages") -> list[int]:
        from .chat import ChatFormatError

        try:
            text = self.state.template.render(messages, add_generation_prompt=True)
        except ChatFormatError as e:
            p = e.param if param == "messages" else (e.param or "").replace("messages", param, 1) or param
            raise APIError(400, str(e), param=p) from None
        return self.state.engine.codec.encode(text)

    # -- the common path ------------------------------------------------------------------
    async def generate(self, request: Any, endpoint: str, body: dict, ids: list[int], shape: Shape,
                       cfg: Any, requested: int | None, stream: bool) -> Any:
        from fastapi.responses import JSONResponse, StreamingResponse

        from ..types import InferenceContext

        st = self.state
        opts = st.options
        room = opts.ctx_size - len(ids)
        limit = min(x for x in (requested, room, opts.max_tokens) if x is not None)
        cfg.max_new_tokens = max(1, limit)
        context = InferenceContext(
            model=opts.model_id, prompt_tokens=len(ids), max_new_tokens=cfg.max_new_tokens, host="serve",
            cache_prompt=_bool(body, "cache_prompt", True),
            extra={"endpoint": endpoint, "stream": stream, "client": request_client(request)},
        )
        sem = st.semaphore()
        st.waiting += 1
        try:
            await asyncio.wait_for(sem.acquire(), opts.queue_timeout)
        except asyncio.TimeoutError:
            retry = st.retry_after()
            raise APIError(503, f"the server is busy: {opts.max_concurrency} request(s) generating and none finished "
                                f"within {opts.queue_timeout:g} s; retry after {retry} s",
                           type="server_error", code="server_busy", headers={"Retry-After": str(retry)}) from None
        finally:
            st.waiting -= 1
        try:
            job = Job(st, ids, cfg, context, stream)
            job.start()
        except BaseException:
            sem.release()
            raise
        if not stream:
            await job.wait(request)
            return JSONResponse(self._finish(endpoint, job, shape, stream=False))
        first = await job.queue.get()  # admission (KV budget) is decided before the first token
        if first[0] == "done" and job.error is not None:
            self._finish(endpoint, job, shape, stream=True, render=False)  # raises the HTTP error

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                for ev in shape.start():
                    yield shape.sse(ev)
                pending = [first]
                while True:
                    kind, val = pending.pop() if pending else await job.queue.get()
                    if kind == "done":
                        finished = True
                        break
                    yield shape.sse(shape.delta(val))
                try:
                    final = self._finish(endpoint, job, shape, stream=True, render=False)
                except APIError as e:
                    yield shape.sse({**e.body(), "type": "error"} if isinstance(shape, ResponsesShape) else e.body())
                else:
                    for ev in shape.end(final):
                        yield shape.sse(ev)
                if shape.sse_done:
                    yield "data: [DONE]\n\n"
            finally:
                if not finished:
                    job.cancel.set()  # client went away (or the server stops): stop generating
                    log.info("request %s: client disconnected, generation cancelled", context.request_id)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _finish(self, endpoint: str, job: Job, shape: Shape, *, stream: bool, render: bool = True) -> Any:
        """Record the finished job; return the response body (or the result when not
        ``render``). Raises :class:`APIError` if the run failed."""
        from ..engine import ContextLengthError
        from ..resources.budget import BudgetExceeded

        st = self.state
        if job.error is not None:
            e = job.error
            if isinstance(e, BudgetExceeded):
                raise APIError(e.status, str(e), type="server_error" if e.status == 503 else "rate_limit_error",
                               code=e.code, headers={"Retry-After": str(math.ceil(e.retry_after_s))})
            if isinstance(e, ContextLengthError):
                raise APIError(400, str(e), param="messages" if "chat" in endpoint else "prompt", code="context_length_exceeded")
            # anything else is the server's fault (a plugin, the policy, the model), not the client's
            log.error("request %s failed: %r", job.context.request_id, e, exc_info=e)
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
        res = job.result
        tt = job.token_times
        s = res.stats
        st.last_stats = {
            "time_to_first_token": round(s.ttft_ms / 1e3, 6) if s.ttft_ms is not None else None,
            "tokens_per_second": round(s.decode_tps, 3),
            "input_tokens": len(res.prompt_ids),
            "output_tokens": len(res.token_ids),
            "prompt_tokens": len(res.prompt_ids),
            "decode_token_times": [round(b - a, 6) for a, b in zip(tt, tt[1:])],
            "finish_reason": res.finish_reason,
            "request_id": s.request_id,
            "policy": s.policy_name,
            "kv_bytes": s.kv.total_bytes,
            "cache_n": s.cache_n,
        }
        t = timings_of(res)
        log.info("request %s %s: prompt %d, completion %d tokens, TTFT %.1f ms, %.1f tokens/s, %s",
                 s.request_id, endpoint, t["prompt_n"], t["predicted_n"], t["prompt_ms"], t["predicted_per_second"],
                 res.finish_reason)
        return shape.body(res) if render else res

    # -- endpoints ------------------------------------------------------------------------
    async def chat_completions(self, request: Any) -> Any:
        body = await self.json_body(request)
        st = self.state
        cfg, requested = parse_generation(body, st.defaults, max_tokens_field=("max_tokens", "max_completion_tokens"))
        stream = _bool(body, "stream")
        ids = self.check_ids(await off_loop(self.chat_ids, body.get("messages")), "messages")
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        shape = ChatShape(rid, st.options.model_id, int(time.time()), include_usage=_include_usage(body))
        return await self.generate(request, "/v1/chat/completions", body, ids, shape, cfg, requested, stream)

    async def completions(self, request: Any) -> Any:
        body = await self.json_body(request)
        st = self.state
        cfg, requested = parse_generation(body, st.defaults, max_tokens_field=("max_tokens",))
        stream = _bool(body, "stream")
        ids, text = await off_loop(self.prompt_ids, body)
        self.check_ids(ids, "prompt")
        echo = text if _bool(body, "echo") else ""
        rid = "cmpl-" + uuid.uuid4().hex[:24]
        shape = CompletionShape(rid, st.options.model_id, int(time.time()), echo_prefix=echo, include_usage=_include_usage(body))
        return await self.generate(request, "/v1/completions", body, ids, shape, cfg, requested, stream)

    async def responses(self, request: Any) -> Any:
        body = await self.json_body(request)
        st = self.state
        cfg, requested = parse_generation(body, st.defaults, max_tokens_field=("max_output_tokens",))
        stream = _bool(body, "stream")
        ids = self.check_ids(await off_loop(self.chat_ids, _responses_messages(body), "input"), "input")
        rid = "resp_" + uuid.uuid4().hex[:24]
        shape = ResponsesShape(rid, st.options.model_id, int(time.time()), request=body)
        return await self.generate(request, "/v1/responses", body, ids, shape, cfg, requested, stream)

    def model_entry(self) -> dict[str, Any]:
        o = self.state.options
        return {"id": o.model_id, "object": "model", "created": int(self.state.started), "owned_by": "lemonade-inferos",
                "checkpoint": o.checkpoint, "recipe": "inferos", "downloaded": True, "labels": [],
                "context_length": o.ctx_size}

    def health(self) -> dict[str, Any]:
        from .. import __version__

        o, st = self.state.options, self.state
        return {
            "status": "ok", "version": __version__, "model_loaded": o.model_id, "checkpoint_loaded": o.checkpoint,
            "context_size": o.ctx_size, "max_concurrency": o.max_concurrency, "active_requests": st.active,
            "waiting_requests": st.waiting,
            "all_models_loaded": [{"model_name": o.model_id, "checkpoint": o.checkpoint, "type": "llm", "device": "cpu",
                                   "recipe": "inferos", "recipe_options": {"ctx_size": o.ctx_size}, "backend_url": None}],
        }

    async def load(self, request: Any) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        asked = body.get("model_name") or body.get("model") or body.get("checkpoint") if isinstance(body, dict) else None
        o = self.state.options
        note = "" if not asked or asked == o.model_id else f"; requests for {asked!r} are answered by it"
        return {"status": "success", "model_name": o.model_id,
                "message": f"Model {o.model_id!r} is loaded (inferos serve runs one model, given with -m){note}"}


def _include_usage(body: dict) -> bool:
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
        raise _bad("stream_options", so, "an object like {'include_usage': true}")
    return bool(so.get("include_usage", False))


# -- the app --------------------------------------------------------------------------------
def create_app(
    engine: Any,
    *,
    ctx_size: int | None = None,
    max_concurrency: int = 1,
    queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT,
    max_tokens: int | None = None,
    model_id: str | None = None,
    template: Any = None,
    max_body_bytes: int | None = None,
    allowed_hosts: Any = LOOPBACK,
) -> Any:
    """The FastAPI app serving ``engine`` (see the module docstring for the endpoints).

    Args:
        engine: an :class:`~lemonade_inferos.engine.Engine` (e.g. from
            :func:`lemonade_inferos.host.build_engine`, so the hooks and agent are wired).
        ctx_size: context cap in tokens; None or more than the model's = the model's.
        max_concurrency: generations running at once (>= 1); more wait for a slot.
        queue_timeout: seconds a request waits for a slot before 503 (None = forever).
        max_tokens: server-side cap on generated tokens per request (None = context only).
        model_id: the name responses and ``/models`` give (default: the folder's name).
        template: a :class:`~lemonade_inferos.integrations.chat.ChatTemplate`
            (default: the model folder's).
        max_body_bytes: request body limit in bytes (413 above it); None = 8 MiB.
        allowed_hosts: accepted ``Host`` header names (any port); None accepts any
            (see :mod:`~lemonade_inferos.integrations.serve_guard`).

    Raises:
        ValueError: a limit is out of range (names it).

    ``app.state.inferos`` is the :class:`ServerState` (last stats, recent requests).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__
    from .chat import ChatTemplate
    from .serve_guard import DEFAULT_MAX_BODY_BYTES, add_guard

    model_ctx = int(engine.spec.context_length)
    if ctx_size is not None and (not isinstance(ctx_size, int) or ctx_size < 2):
        raise ValueError(f"ctx_size={ctx_size!r} is not allowed; must be an integer >= 2")
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ValueError(f"max_concurrency={max_concurrency!r} is not allowed; must be an integer >= 1")
    if queue_timeout is not None and not (queue_timeout > 0):
        raise ValueError(f"queue_timeout={queue_timeout!r} is not allowed; must be > 0 seconds (or None)")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens={max_tokens!r} is not allowed; must be an integer >= 1 (or None)")
    if max_body_bytes is not None and (not isinstance(max_body_bytes, int) or max_body_bytes < 1):
        raise ValueError(f"max_body_bytes={max_body_bytes!r} is not allowed; must be an integer >= 1 (or None)")
    folder = Path(engine.spec.folder)
    options = ServerOptions(
        model_id=model_id or engine.spec.name or folder.name,
        ctx_size=min(ctx_size or model_ctx, model_ctx),
        max_concurrency=max_concurrency, queue_timeout=queue_timeout, max_tokens=max_tokens, checkpoint=str(folder),
    )
    template = template or ChatTemplate.from_model_dir(folder)
    state = ServerState(engine, options, template, SamplingDefaults.from_model_dir(folder))
    handlers = App(state)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="inferos serve", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="OpenAI-compatible backend on the inferos engine (Lemonade ryzenai-server contract).")
    app.state.inferos = state
    add_guard(app, allowed_hosts=allowed_hosts, max_body_bytes=DEFAULT_MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = (f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405)
               else str(exc.detail))
        return JSONResponse(error_body(msg, code="not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        log.exception("unexpected error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", type="server_error"), status_code=500)

    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [handlers.model_entry()]}

    async def model(model_id: str) -> Any:
        entry = handlers.model_entry()
        if model_id != entry["id"]:
            raise APIError(404, f"The model {model_id!r} does not exist; this server runs {entry['id']!r}",
                           param="model", code="model_not_found")
        return entry

    async def health() -> dict[str, Any]:
        return handlers.health()

    async def stats() -> dict[str, Any]:
        return state.last_stats

    async def unload() -> dict[str, Any]:
        return {"status": "success", "message": "inferos serve keeps its one model loaded"}

    async def chat_completions(request: Request) -> Any:
        return await handlers.chat_completions(request)

    async def completions(request: Request) -> Any:
        return await handlers.completions(request)

    async def responses(request: Request) -> Any:
        return await handlers.responses(request)

    async def load(request: Request) -> Any:
        return await handlers.load(request)

    routes: list[tuple[str, Any, str]] = [
        ("/health", health, "GET"), ("/models", models, "GET"), ("/models/{model_id}", model, "GET"),
        ("/chat/completions", chat_completions, "POST"), ("/completions", completions, "POST"),
        ("/responses", responses, "POST"), ("/stats", stats, "GET"),
        ("/load", load, "POST"), ("/unload", unload, "POST"),
    ]
    for prefix in PREFIXES:
        for path, fn, method in routes:
            app.add_api_route(prefix + path, fn, methods=[method], include_in_schema=prefix == "/v1")

    return app


# -- running it ------------------------------------------------------------------------------
class BackgroundServer:
    """Run an ASGI app with uvicorn in a daemon thread (tests, embedding).

    ``with BackgroundServer(app) as srv: srv.url`` – port 0 picks a free loopback port.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="inferos-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(args: argparse.Namespace) -> int:
    """``inferos serve``: build the engine (hooks, policy, agent client) and run uvicorn.

    Returns an exit code (2 with a message on stderr for a bad model folder or policy).
    """
    from ..listen import ListenError, listen_socket
    from ..model.spec import ModelFolderError
    from ..policy import PolicyError
    from .serve_guard import allowed_hosts_for

    verbose = bool(getattr(args, "serve_verbose", False) or getattr(args, "verbose", False))
    logging.getLogger("lemonade_inferos").setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.host not in LOOPBACK:
        print(f"inferos serve: warning: binding {args.host}: the API has no authentication; "
              "anyone who can reach this address can use the model", file=sys.stderr)
    if getattr(args, "baseline", False):
        os.environ["INFEROS_DISABLE"] = "1"
    try:
        sock = listen_socket(args.host, args.port)  # before loading: a busy port fails at once
    except ListenError as e:
        print(f"inferos serve: error: {e}", file=sys.stderr)
        return 2
    rm = None
    try:
        from ..host import build_engine

        model = args.model
        if model is None:
            from ..model.embedded import embedded_model_dir

            model = embedded_model_dir(progress=lambda m: print(m, file=sys.stderr))
        engine = build_engine(model, args.policy)
        if not getattr(args, "no_resource_manager", True):
            from ..resources.manager import attach_from_args

            rm = attach_from_args(engine, args)
        if getattr(args, "prefix_cache_bytes", None) is not None:
            engine.prefix_cache.set_max_bytes(args.prefix_cache_bytes)
        # load and run the model now: /health answers only once requests can succeed
        engine.preload()
        app = create_app(engine, ctx_size=args.ctx_size, max_concurrency=args.max_concurrency,
                         queue_timeout=args.queue_timeout or None, max_tokens=args.max_tokens, model_id=args.model_id,
                         max_body_bytes=getattr(args, "max_body_bytes", None),
                         allowed_hosts=allowed_hosts_for(args.host, getattr(args, "allowed_host", None) or ()))
    except (ModelFolderError, PolicyError, ValueError, FileNotFoundError) as e:
        sock.close()
        if rm is not None and getattr(rm, "runtime", None) is not None:
            rm.runtime.loops.stop()  # no control-loop thread may still be running ORT at exit
        print(f"inferos serve: error: {e}", file=sys.stderr)
        return 2
    st: ServerState = app.state.inferos
    o = st.options
    if args.ctx_size and args.ctx_size > engine.spec.context_length:
        print(f"inferos serve: --ctx-size {args.ctx_size} exceeds the model's context of "
              f"{engine.spec.context_length} tokens; using {o.ctx_size}", file=sys.stderr)
    disabled = not getattr(engine.pm, "enabled", True)
    print(f"inferos serve: model {o.model_id} ({o.checkpoint}), context {o.ctx_size} tokens, "
          f"policy {'baseline (INFEROS_DISABLE=1)' if disabled else engine.policy.name}, "
          f"max concurrency {o.max_concurrency}, chat template {st.template.origin}, "
          f"prefix cache {_size_or_off(engine.prefix_cache.max_bytes)}", file=sys.stderr)
    port = sock.getsockname()[1]
    print(f"inferos serve: listening on http://{args.host}:{port} (OpenAI API at /v1 and /api/v1)",
          file=sys.stderr, flush=True)
    import uvicorn

    try:
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level="info" if verbose else "warning",
                                      access_log=verbose, timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        if rm is not None and getattr(rm, "runtime", None) is not None:
            rm.runtime.loops.stop()  # the control loops' thread ends before the interpreter does
    return 0


def _size_or_off(n: int) -> str:
    from ..policy import format_size

    return format_size(n) if n else "off"


def ryzenai_main(argv: list[str] | None = None) -> int:
    """Entry point with ``ryzenai-server``'s command line (``-m DIR --port N --ctx-size N
    [--verbose]``, plus every ``inferos serve`` option): ``python -m
    lemonade_inferos.integrations.server ...``, or a console script of that name."""
    from .cli import SERVE_EPILOG, add_serve_arguments

    parser = argparse.ArgumentParser(prog="ryzenai-server", epilog=SERVE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="inferos serve, under the name Lemonade's lemond gives its OGA backend.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(ryzenai_main())
