"""Property-based fuzzing of ``inferos serve`` over the OpenAI request schema (hypothesis),
beside the agent's schemathesis fuzz (test_agent_fuzz.py).

A real ``inferos serve`` process on loopback (``serve_process`` fixture, embedded model,
``--max-tokens 16``) gets bodies for ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/responses`` built from every documented request field, each either a valid value or
arbitrary JSON (wrong types, out of range, huge integers, nesting, unicode), plus bodies that
are not objects at all. Every answer must be a 2xx or a 4xx in OpenAI's error shape — never a
5xx — and a streamed answer must not end in a server error. Meanwhile a thread polls
``/health``; every poll must answer 200 within its 5 s timeout (generous on a loaded 2-core
box; a blocked event loop holds it for the whole request).

Bounded: ``MAX_EXAMPLES`` bodies per endpoint, derandomized, no example database.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 120
JSON_HEADERS = {"Content-Type": "application/json"}

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30), st.just(10**400),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)

text = st.text(min_size=1, max_size=200)
roles = st.sampled_from(["system", "user", "assistant", "developer", "tool", "wizard"])
content = st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                           "text": text}), max_size=3))
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": content}), min_size=1, max_size=4)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A request field's valid values (the garbage comes from :func:`bodies`)."""
    return valid


COMMON = {
    "model": field(st.sampled_from(["stories260K", "gpt-4o", ""])),
    "temperature": field(st.floats(0, 2)),
    "top_p": field(st.floats(0, 1, exclude_min=True)),
    "top_k": field(st.integers(0, 600)),
    "seed": field(st.integers(-(2**70), 2**70)),
    "stop": field(st.one_of(text, st.lists(text, max_size=17))),
    "stream": field(st.booleans()),
    "repetition_penalty": field(st.floats(1, 3)),
    "frequency_penalty": field(st.floats(-2, 2)),
    "presence_penalty": field(st.floats(-2, 2)),
    "ignore_eos": field(st.booleans()),
    "n": field(st.integers(1, 3)),
    "logprobs": field(st.booleans()),
    "response_format": field(st.just({"type": "text"})),
    "tools": field(st.just([])),
}
ENDPOINTS = {
    "/v1/chat/completions": {**COMMON, "messages": field(messages), "max_tokens": field(st.integers(1, 600)),
                             "max_completion_tokens": field(st.integers(1, 600)),
                             "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()}))},
    "/v1/completions": {**COMMON, "prompt": field(st.one_of(text, st.lists(st.integers(0, 600), min_size=1, max_size=40),
                                                           st.lists(text, min_size=1, max_size=2))),
                        "max_tokens": field(st.integers(1, 600)), "echo": field(st.booleans()),
                        "suffix": field(st.just(""))},
    "/v1/responses": {**COMMON, "input": field(st.one_of(text, messages)), "instructions": field(text),
                      "max_output_tokens": field(st.integers(1, 600))},
}


PRIMARY = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/responses": "input"}


def bodies(fields: dict[str, st.SearchStrategy], primary: str) -> st.SearchStrategy:
    """A third valid bodies (the primary field and valid optional ones), a third valid
    bodies with one to three fields replaced by arbitrary JSON, a third anything at all."""
    valid = st.fixed_dictionaries({primary: fields[primary]},
                                  optional={k: v for k, v in fields.items() if k != primary})
    garbage = st.dictionaries(st.sampled_from(sorted(fields)), json_values, min_size=1, max_size=3)
    mutated = st.tuples(valid, garbage).map(lambda t: {**t[0], **t[1]})
    return st.one_of(valid, mutated, json_values)


class HealthWatch:
    """Polls /health every 0.2 s in a thread; keeps every failure."""

    def __init__(self, url: str):
        self.url, self.polls, self.failures = url, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self._stop.is_set():
                try:
                    r = c.get(self.url + "/health")
                    if r.status_code != 200:
                        self.failures.append(f"HTTP {r.status_code}")
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                self.polls += 1
                self._stop.wait(0.2)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def _check(resp: httpx.Response, raw: bytes) -> None:
    req = raw[:300]
    assert resp.status_code < 500, (resp.status_code, resp.text[:500], req)
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["message"], (resp.text, req)
        return
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        assert "server_error" not in resp.text, (resp.text[-500:], req)
    else:
        resp.json()


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_serve_never_5xx_and_health_answers(serve_process, path):
    sent = {"n": 0, "2xx": 0}
    with HealthWatch(serve_process) as watch, httpx.Client(base_url=serve_process, timeout=60) as client:
        @given(body=bodies(ENDPOINTS[path], PRIMARY[path]))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(body) -> None:
            raw = json.dumps(body).encode()
            resp = client.post(path, content=raw, headers=JSON_HEADERS)
            _check(resp, raw)
            sent["n"] += 1
            sent["2xx"] += resp.status_code < 300

        t0 = time.monotonic()
        run()
        elapsed = time.monotonic() - t0
    assert not watch.failures, watch.failures[:5]
    assert watch.polls >= 1
    assert sent["2xx"] > 0  # some bodies were valid and generated
    print(f"{path}: {sent['n']} requests ({sent['2xx']} 2xx) in {elapsed:.1f} s, {watch.polls} /health polls")


def test_serve_rejects_non_json_bytes(serve_process):
    with httpx.Client(base_url=serve_process, timeout=30) as client:
        for raw in (b"\xff\xfe\x00", b"{", b"[]", b'"x"', b"null", b"1e999999", b'{"a":' * 5000):
            r = client.post("/v1/chat/completions", content=raw, headers=JSON_HEADERS)
            assert r.status_code == 400, (raw[:20], r.status_code, r.text[:200])
        assert client.get("/health").status_code == 200
