"""``inferos serve`` end to end: a real uvicorn on a free loopback port, the official
``openai`` client and raw httpx, the embedded model, and a recorder plugin that sees every
PostRun ``RunStats`` the engine reports (so usage/timings are checked against the engine's
own numbers, not against themselves)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from lemonade_inferos.engine import GenerationConfig
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.integrations.chat import PLAIN_TEMPLATE, ChatFormatError, ChatTemplate
from lemonade_inferos.integrations.server import BackgroundServer, create_app

openai = pytest.importorskip("openai")

STORY = "Once upon a time, there was a little girl named Lily."


class Recorder:
    """Keeps every before/after_request the engine fires."""

    def __init__(self) -> None:
        self.contexts: list = []
        self.stats: list = []
        self.lock = threading.Lock()

    @hookimpl
    def before_request(self, context, policy):
        with self.lock:
            self.contexts.append(context)

    @hookimpl
    def after_request(self, context, stats):
        with self.lock:
            self.stats.append(stats)

    def stats_for(self, request_id: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for s in self.stats:
                    if s.request_id == request_id:
                        return s
            time.sleep(0.02)
        raise AssertionError(f"no PostRun stats for request {request_id}")

    def context_for(self, request_id: str):
        with self.lock:
            return next(c for c in self.contexts if c.request_id == request_id)


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def engine(embedded_model, recorder):
    from lemonade_inferos.host import build_engine
    from lemonade_inferos.plugins import get_plugin_manager

    pm = get_plugin_manager(enabled=True, extra=[("test.recorder", recorder)], entry_points=False)
    return build_engine(embedded_model, "default", pm=pm)


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, max_concurrency=1)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def slow_down(monkeypatch, engine, seconds: float = 0.01) -> dict:
    """Make every model step take ``seconds`` more (a stand-in for a big model), and count
    how many generations run at once."""
    real = engine._run
    seen = {"now": 0, "max": 0}
    lock = threading.Lock()
    tls = threading.local()

    def slow(*a, **k):
        if not getattr(tls, "inside", False):
            tls.inside = True
            with lock:
                seen["now"] += 1
                seen["max"] = max(seen["max"], seen["now"])
        time.sleep(seconds)
        return real(*a, **k)

    def done(*a, **k):
        tls.inside = False
        with lock:
            seen["now"] -= 1

    monkeypatch.setattr(engine, "_run", slow)
    real_finish = engine._finish

    def finish(*a, **k):
        if getattr(tls, "inside", False):
            done()
        return real_finish(*a, **k)

    monkeypatch.setattr(engine, "_finish", finish)
    return seen


# -- health, models, Lemonade surface ---------------------------------------------------------
def test_health_models_and_prefix_aliases(server, engine):
    for prefix in ("", "/v1", "/api/v1", "/api/v0"):
        h = httpx.get(f"{server.url}{prefix}/health").json()
        assert h["status"] == "ok"
        assert h["model_loaded"] == "stories260K"
        assert h["context_size"] == engine.spec.context_length == 512
        assert h["all_models_loaded"][0]["recipe_options"]["ctx_size"] == 512
    models = httpx.get(server.url + "/api/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["stories260K"]
    assert httpx.get(server.url + "/v1/models/stories260K").json()["id"] == "stories260K"
    r = httpx.get(server.url + "/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_unknown_route_is_openai_error(server):
    r = httpx.post(server.url + "/v1/nothing", json={})
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "POST /v1/nothing" in err["message"]


def test_load_is_acknowledged(server):
    r = httpx.post(server.url + "/api/v1/load", json={"model_name": "Llama-3.2-1B-Instruct-Hybrid", "ctx_size": 4096})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "success" and body["model_name"] == "stories260K"
    assert "Llama-3.2-1B-Instruct-Hybrid" in body["message"]
    assert httpx.post(server.url + "/api/v1/unload").json()["status"] == "success"


# -- chat completions -------------------------------------------------------------------------
def test_chat_non_streaming_matches_engine(client, engine, recorder):
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about Lily."}]
    r = client.chat.completions.create(model="anything", messages=messages, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == "stories260K"
    assert r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    # the prompt is the model folder's chat template, tokenized by the engine's tokenizer
    prompt = "System: You tell stories.\nUser: Tell me about Lily.\nAssistant:"
    ids = engine.codec.encode(prompt)
    assert r.usage.prompt_tokens == len(ids)
    direct = engine.generate(ids, GenerationConfig(max_new_tokens=24), baseline=False)
    assert text == direct.text
    assert r.usage.completion_tokens == len(direct.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if direct.finish_reason == "length" else "stop")
    # usage and timings equal what the engine reported to the PostRun hook
    extra = r.model_extra
    rid = extra["inferos"]["request_id"]
    st = recorder.stats_for(rid)
    assert st.prompt_tokens == r.usage.prompt_tokens
    assert st.generated_tokens == r.usage.completion_tokens
    t = extra["timings"]
    assert t["prompt_n"] == r.usage.prompt_tokens
    assert t["predicted_n"] == r.usage.completion_tokens
    assert t["cache_n"] == 0
    assert t["prompt_ms"] == pytest.approx(st.ttft_ms, abs=1e-3)
    assert t["predicted_ms"] == pytest.approx(st.total_ms - st.ttft_ms, abs=2e-3)
    assert t["predicted_per_second"] == pytest.approx(st.decode_tps, rel=1e-3)
    assert t["predicted_per_second"] == pytest.approx((t["predicted_n"] - 1) * 1e3 / t["predicted_ms"], rel=2e-3)
    # the request went through the hooks as a "serve" request
    ctx = recorder.context_for(rid)
    assert ctx.host == "serve" and ctx.model == "stories260K"
    assert ctx.prompt_tokens == len(ids) and ctx.max_new_tokens == 24
    assert ctx.extra["endpoint"] == "/v1/chat/completions"


def test_chat_streaming_equals_non_streaming(client, server):
    kw = dict(model="m", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=40, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == full.choices[0].finish_reason
    # usage + timings ride on the finish chunk, and (include_usage) on a last chunk with no choices
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.model_extra["timings"]["predicted_n"] == last.usage.completion_tokens
    # the same prompt again: its KV state comes from the prefix cache (llama.cpp's timings:
    # prompt_n = tokens prefilled, cache_n = tokens reused, together the prompt)
    t = finishing[0].model_extra["timings"]
    assert t["prompt_n"] + t["cache_n"] == full.usage.prompt_tokens and t["prompt_n"] >= 1
    # and the raw stream ends with [DONE]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**kw, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "timings" in events[-1] and events[-1]["choices"][0]["finish_reason"]
    assert events[-1]["usage"]["completion_tokens"] == full.usage.completion_tokens


def test_stop_sequence_cuts_text(client):
    kw = dict(model="m", prompt=STORY, max_tokens=60, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    words = free.split()
    stop = " " + words[min(6, len(words) - 1)]
    cut = free[: free.index(stop)]
    r = client.completions.create(stop=[stop, "\u0000never"], **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw) if c.choices)
    assert streamed == cut


def test_completions_stream_and_echo(client, engine):
    kw = dict(model="m", prompt="Tom and his dog went to the park.", max_tokens=30, temperature=0)
    full = client.completions.create(**kw)
    assert full.object == "text_completion"
    assert full.usage.prompt_tokens == len(engine.codec.encode(kw["prompt"]))
    parts = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in parts if c.choices) == full.choices[0].text
    assert parts[-1].usage.completion_tokens == full.usage.completion_tokens
    echoed = client.completions.create(echo=True, **kw).choices[0].text
    assert echoed == kw["prompt"] + full.choices[0].text
    # token-id prompts are taken as they are
    ids = engine.codec.encode(kw["prompt"])
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=30, temperature=0)
    assert by_ids.choices[0].text == full.choices[0].text


def test_sampling_is_seeded(client):
    kw = dict(model="m", prompt="Once upon a time", max_tokens=30, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"top_k": 40, "repetition_penalty": 1.1})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text


def test_responses_api(client):
    r = client.responses.create(model="m", input="Tell me a story.", instructions="Be brief.", max_output_tokens=16,
                                temperature=0)
    assert r.output_text
    assert r.usage.output_tokens <= 16 and r.usage.input_tokens > 0
    events = list(client.responses.create(model="m", input="Tell me a story.", instructions="Be brief.",
                                          max_output_tokens=16, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text


def test_lemonade_stats_after_request(server, client):
    r = client.completions.create(model="m", prompt=STORY, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    s = httpx.get(server.url + "/api/v1/stats").json()
    assert s["input_tokens"] == r.usage.prompt_tokens
    assert s["output_tokens"] == r.usage.completion_tokens == 12
    assert len(s["decode_token_times"]) == 11 and all(x >= 0 for x in s["decode_token_times"])
    assert s["time_to_first_token"] == pytest.approx(r.model_extra["timings"]["prompt_ms"] / 1e3, abs=1e-5)
    assert s["tokens_per_second"] == pytest.approx(r.model_extra["timings"]["predicted_per_second"], rel=1e-3)


# -- errors -----------------------------------------------------------------------------------
def _err(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_over_long_prompt_is_400(server, client):
    long_prompt = "Once upon a time there was a dog. " * 80
    err = _err(httpx.post(server.url + "/v1/completions", json={"prompt": long_prompt}))
    assert err["type"] == "invalid_request_error" and err["code"] == "context_length_exceeded"
    assert err["param"] == "prompt" and "512" in err["message"]
    err = _err(httpx.post(server.url + "/api/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": long_prompt}]}))
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": long_prompt}])
    assert e.value.status_code == 400


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", 2.5, "[0, 2]"),
    ("temperature", "hot", "[0, 2]"),
    ("top_p", 0, "(0, 1]"),
    ("max_tokens", 0, ">= 1"),
    ("top_k", -1, ">= 0"),
    ("repetition_penalty", 0.5, ">= 1"),
    ("frequency_penalty", 3, "[-2, 2]"),
    ("seed", 1.5, "integer"),
    ("n", 2, "1"),
    ("stop", [1, 2], "strings"),
    ("stream", "yes", "true or false"),
    ("logprobs", True, "not supported"),
])
def test_bad_fields_are_400_naming_field(server, field, value, needle):
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    err = _err(httpx.post(server.url + "/v1/chat/completions", json=body))
    assert err["param"] == field
    assert field in err["message"] and repr(value) in err["message"] and needle in err["message"]


def test_bad_bodies_are_400(server, client):
    assert "JSON" in _err(httpx.post(server.url + "/v1/completions", content=b"{nope",
                                     headers={"Content-Type": "application/json"}))["message"]
    assert _err(httpx.post(server.url + "/v1/completions", json={}))["param"] == "prompt"
    err = _err(httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}))
    assert err["param"] == "messages[0].role" and "wizard" in err["message"]
    err = _err(httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}))
    assert err["param"] == "messages[0].content[0]"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=9)


# -- context cap, concurrency, cancellation ---------------------------------------------------
def test_ctx_size_caps_context(engine):
    from fastapi.testclient import TestClient

    app = create_app(engine, ctx_size=40)
    with TestClient(app, base_url="http://127.0.0.1") as tc:
        assert tc.get("/health").json()["context_size"] == 40
        ids = engine.codec.encode(STORY)  # 15 tokens
        r = tc.post("/v1/completions", json={"prompt": STORY, "max_tokens": 400, "ignore_eos": True}).json()
        assert r["usage"]["prompt_tokens"] == len(ids)
        assert r["usage"]["completion_tokens"] == 40 - len(ids)
        assert r["choices"][0]["finish_reason"] == "length"
        err = tc.post("/v1/completions", json={"prompt": STORY * 3}).json()["error"]
        assert err["code"] == "context_length_exceeded" and "40" in err["message"]
    assert create_app(engine, ctx_size=100000).state.inferos.options.ctx_size == 512
    with pytest.raises(ValueError, match="max_concurrency"):
        create_app(engine, max_concurrency=0)


def test_disconnect_cancels_generation(server, engine, recorder, monkeypatch):
    slow_down(monkeypatch, engine, 0.01)
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0}
    before = len(recorder.stats)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 5:
                    break
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(recorder.stats) == before:
        time.sleep(0.05)
    assert len(recorder.stats) > before, "the generation never finished after the disconnect"
    st = recorder.stats[-1]
    assert st.finish_reason == "cancelled"
    assert 5 <= st.generated_tokens < 400
    history = server.server.config.app.state.inferos.history
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (history and history[-1].request_id == st.request_id):
        time.sleep(0.02)
    assert history[-1].request_id == st.request_id
    assert history[-1].finish_reason == "cancelled" and history[-1].stream
    # the slot is free again: the next request runs at once
    deadline = time.monotonic() + 5
    while httpx.get(server.url + "/health").json()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.02)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 3}, timeout=10)
    assert r.status_code == 200


def test_disconnect_cancels_non_streaming_request(server, engine, recorder, monkeypatch):
    slow_down(monkeypatch, engine, 0.01)
    before = len(recorder.stats)
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(recorder.stats) == before:
        time.sleep(0.05)
    st = recorder.stats[-1]
    assert st.finish_reason == "cancelled" and st.generated_tokens < 400


def test_max_concurrency_queues_and_503(engine, monkeypatch):
    seen = slow_down(monkeypatch, engine, 0.005)
    app = create_app(engine, max_concurrency=1, queue_timeout=30)
    body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True}
    with BackgroundServer(app) as srv:
        results = []

        def call():
            results.append(httpx.post(srv.url + "/v1/completions", json=body, timeout=60))

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert all(r.json()["usage"]["completion_tokens"] == 40 for r in results)
        assert seen["max"] == 1  # one generation at a time

    busy = create_app(engine, max_concurrency=1, queue_timeout=0.3)
    with BackgroundServer(busy) as srv:
        long = {**body, "max_tokens": 300, "stream": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", srv.url + "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # (keep the iterator: dropping it closes the stream)
            next(lines)  # the first request holds the only slot
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=10)
            err = _err(r, 503)
            assert err["code"] == "server_busy" and err["type"] == "server_error"
            assert int(r.headers["Retry-After"]) >= 1


# -- chat template ----------------------------------------------------------------------------
def test_chat_template_matches_transformers(embedded_model):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(embedded_model))
    tmpl = ChatTemplate.from_model_dir(embedded_model)
    assert tmpl.origin.endswith("(chat_template)")
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    for gen in (True, False):
        assert tmpl.render(conv, add_generation_prompt=gen) == tok.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=gen)


def test_chat_template_fallback_and_validation(tmp_path):
    t = ChatTemplate.from_model_dir(tmp_path)  # no tokenizer_config.json
    assert t.source == PLAIN_TEMPLATE and t.origin == "plain (built-in)"
    msgs = [{"role": "developer", "content": "D"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]}]
    assert t.render(msgs) == "System: D\nUser: ab\nAssistant:"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "chat_template": [{"name": "default", "template": "{{ bos_token }}"
                                                             "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                                                             "{% endfor %}"}]}))
    assert ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "<s>[user]x"
    with pytest.raises(ChatFormatError) as e:
        t.render([])
    assert e.value.param == "messages"
    with pytest.raises(ChatFormatError) as e:
        t.render([{"role": "user"}])
    assert e.value.param == "messages[0].content"
