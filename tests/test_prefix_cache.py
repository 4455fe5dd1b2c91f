"""Prefix cache: exact full-precision reuse, measured tiered reuse, isolation, LRU, opt-out,
shared prefixes, and ``timings.cache_n`` through a real ``inferos serve`` process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from lemonade_inferos.engine import Engine, GenerationConfig
from lemonade_inferos.engine.prefix_cache import PrefixCache, common_prefix_length, probe_cost
from lemonade_inferos.kv.base import FullPrecisionKVCache, KVCacheReuseError
from lemonade_inferos.plugins import get_plugin_manager
from lemonade_inferos.policy import load_policy
from lemonade_inferos.types import InferenceContext

STORY = ("Once upon a time there was a little girl named Lily. She liked to play with her toys in the park. "
         "One day she saw a big red ball under a tree. She ran to the ball and kicked it very far. ")


@pytest.fixture(scope="module")
def fp_engine(embedded_model):
    pol = load_policy("default").merged({"kv": {"mode": "disabled"}}, name="fp")
    return Engine(embedded_model, pm=get_plugin_manager(entry_points=False), policy=pol)


@pytest.fixture(scope="module")
def tiered_engine(embedded_model):
    return Engine(embedded_model, pm=get_plugin_manager(entry_points=False), policy=load_policy("default"))


def _ctx(ids, **kw) -> InferenceContext:
    return InferenceContext(model="t", prompt_tokens=len(ids), **kw)


def _run(eng: Engine, cache, ids, start: int) -> np.ndarray:
    sess = eng.session(cache.graph_file, eng.policy)
    return eng._run(sess, cache, np.asarray([ids], dtype=np.int64), start, ort.RunOptions(), True)


def _new_cache(eng: Engine):
    return eng.pm.kv_cache(eng.policy, eng.spec, _ctx([0]))


# -- full precision: exact ----------------------------------------------------------------------
def test_fp_reuse_gives_fresh_prefill_logits(fp_engine):
    eng = fp_engine
    eng.prefix_cache.clear()
    ids = eng.encode(STORY)
    r1 = eng.generate(ids, GenerationConfig(max_new_tokens=16, stop_on_eos=False))
    assert r1.stats.cache_n == 0
    fed = ids + r1.token_ids[:-1]  # the last generated token is never fed back
    follow = fed + eng.encode(" Then her mom called her home.")[1:]
    cache = _new_cache(eng)
    reuse = eng.prefix_cache.begin(follow, cache, budget_ppl=0.5)
    assert reuse.start == len(fed) and cache.seq_length == len(fed)
    reused = _run(eng, cache, follow[reuse.start:], reuse.start)
    fresh = _run(eng, _new_cache(eng), follow, 0)[reuse.start:]
    np.testing.assert_allclose(reused, fresh, rtol=0, atol=1e-4)
    # through generate: same tokens as a request that opted out
    a = eng.generate(follow, GenerationConfig(max_new_tokens=12))
    b = eng.generate(follow, GenerationConfig(max_new_tokens=12), context=_ctx(follow, cache_prompt=False))
    assert a.stats.cache_n >= len(fed) and b.stats.cache_n == 0
    assert a.token_ids == b.token_ids


def test_never_reused_for_a_different_sequence(fp_engine):
    eng = fp_engine
    eng.prefix_cache.clear()
    ids = eng.encode(STORY)
    eng.generate(ids, GenerationConfig(max_new_tokens=4))
    k = len(ids) // 2
    other = list(ids)
    other[k] = (other[k] + 7) % eng.spec.vocab_size  # one token differs in the middle
    cache = _new_cache(eng)
    reuse = eng.prefix_cache.begin(other, cache, budget_ppl=0.5)
    assert reuse.start == k  # cut back to the exact common prefix
    reused = _run(eng, cache, other[k:], k)
    fresh = _run(eng, _new_cache(eng), other, 0)[k:]
    np.testing.assert_allclose(reused, fresh, rtol=0, atol=1e-4)
    # a sequence sharing nothing starts from scratch
    unrelated = [eng.spec.bos_token_id] + [(t + 3) % eng.spec.vocab_size for t in ids[1:]]
    assert eng.prefix_cache.begin(unrelated, _new_cache(eng), budget_ppl=0.5).start == 1  # only BOS in common
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2 and common_prefix_length([], [1]) == 0


def test_restore_rejects_other_configurations(fp_engine, tiered_engine):
    fp = _new_cache(fp_engine)
    _run(fp_engine, fp, fp_engine.encode("Lily"), 0)
    snap = fp.snapshot()
    with pytest.raises(KVCacheReuseError, match="cannot be restored"):
        _new_cache(tiered_engine).restore(snap)
    with pytest.raises(KVCacheReuseError, match="empty"):
        fp.restore(snap)
    with pytest.raises(KVCacheReuseError, match="allowed"):
        fp.truncate(fp.seq_length + 1)


def test_shared_prefix_blocks_are_held_once(fp_engine):
    eng = fp_engine
    eng.prefix_cache.clear()
    system = eng.encode(STORY * 2)
    chats = [system + eng.encode(f" Question {i}: what did Lily do on day {i}?")[1:] for i in range(8)]
    results = [None] * 8

    def chat(i):
        results[i] = eng.generate(chats[i], GenerationConfig(max_new_tokens=4))

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st = eng.prefix_cache.stats()
    assert st.entries == 8
    shared = min(common_prefix_length(chats[0], c) for c in chats[1:])
    shared_blocks = shared // eng.prefix_cache.block_tokens * eng.prefix_cache.block_tokens
    bpt = int(eng.spec.kv_bytes_per_token(4))
    # the system prompt's full blocks are held once: 7 of the 8 copies are saved
    assert st.bytes_saved >= 7 * shared_blocks * bpt
    assert st.bytes_held <= st.logical_bytes - 7 * shared_blocks * bpt
    assert st.logical_bytes == sum(len(r.prompt_ids) + len(r.token_ids) - 1 for r in results) * bpt


# -- tiered: measured, bounded --------------------------------------------------------------------
def test_tiered_reuse_is_bounded_by_measured_cost(tiered_engine):
    eng = tiered_engine
    eng.prefix_cache.clear()
    ids = eng.encode(STORY * 2)
    r1 = eng.generate(ids, GenerationConfig(max_new_tokens=8))
    assert r1.stats.kv.tokens_evicted > 0 or r1.stats.kv.level_distribution["L2"] > 0
    (entry,) = eng.prefix_cache.entries()
    c = entry["cost"]
    assert entry["lossy_tokens"] > 0 and c is not None and np.isfinite(c).all()
    assert c.kld >= 0 and c.delta_ppl >= 0  # KL divergence is never negative
    cost = c.delta_ppl
    follow = ids + r1.token_ids[:-1] + eng.encode(" The end.")[1:]
    # within both budgets: reused
    ok = eng.prefix_cache.begin(follow, _new_cache(eng), budget_ppl=cost + 1e-9, max_kld=c.kld + 1e-9)
    assert ok.start > 0 and ok.lossy and ok.cost == c
    # over either budget: re-prefilled, counted
    before = eng.prefix_cache.stats().quality_rejects
    no = eng.prefix_cache.begin(follow, _new_cache(eng), budget_ppl=cost * 0.99)
    assert no.start == 0 and "not reused" in no.note
    assert eng.prefix_cache.begin(follow, _new_cache(eng), budget_ppl=1e9, max_kld=c.kld * 0.99).start == 0
    assert eng.prefix_cache.stats().quality_rejects == before + 2
    # a request's quality_budget is the bound
    res = eng.generate(follow, GenerationConfig(max_new_tokens=4), context=_ctx(follow, quality_budget=cost * 0.99))
    assert res.stats.cache_n == 0


def test_tiered_chat_reuses_the_prompt_state_when_the_reply_is_re_rendered(tiered_engine):
    eng = tiered_engine
    eng.prefix_cache.clear()
    ids = eng.encode(STORY * 2)
    r = eng.generate(ids, GenerationConfig(max_new_tokens=80, stop_on_eos=False))
    kinds = {(e["tokens"], e["floor"]) for e in eng.prefix_cache.entries()}
    final = len(ids) + len(r.token_ids) - 1
    assert any(t == final and f > len(ids) for t, f in kinds)  # the final state cannot be cut to the prompt
    assert any(t == len(ids) for t, _ in kinds)  # so the prompt's own state is kept too
    # the next prompt re-renders the reply differently from its first token on
    nxt = ids + [(r.token_ids[0] + 1) % eng.spec.vocab_size] + eng.encode(" The end.")[1:]
    res = eng.generate(nxt, GenerationConfig(max_new_tokens=2), context=_ctx(nxt, quality_budget=1e9))
    assert res.stats.cache_n == len(ids)


def test_probe_cost_of_an_exact_state_is_zero(fp_engine):
    eng = fp_engine
    ids = eng.encode(STORY)
    cache = _new_cache(eng)
    logits = _run(eng, cache, ids, 0)
    p = 12
    cost = probe_cost(cache.snapshot(), _new_cache(eng), ids[-p:], logits[-p:-1],
                      lambda c, x, pos: _run(eng, c, x[0].tolist(), pos))
    assert abs(cost.delta_ppl) < 1e-4 and abs(cost.kld) < 1e-6 and abs(cost.delta_nll) < 1e-4


def test_lossless_tiered_state_reuse_matches_fresh(tiered_engine):
    eng = tiered_engine
    eng.prefix_cache.clear()
    ids = eng.encode("Lily had a cat.")  # far below sinks + recent window: nothing quantized
    cache = _new_cache(eng)
    _run(eng, cache, ids, 0)
    assert cache.lossy_tokens() == 0 and cache.truncate_floor() == 0
    follow = ids + eng.encode(" The cat was soft.")[1:]
    restored = _new_cache(eng)
    restored.restore(cache.snapshot())
    reused = _run(eng, restored, follow[len(ids):], len(ids))
    fresh = _run(eng, _new_cache(eng), follow, 0)[len(ids):]
    np.testing.assert_allclose(reused, fresh, rtol=0, atol=2e-2)  # L0 holds float16
    assert np.argmax(reused, -1).tolist() == np.argmax(fresh, -1).tolist()


def test_tiered_truncate_respects_floor(tiered_engine):
    eng = tiered_engine
    cache = _new_cache(eng)
    ids = eng.encode(STORY * 2)
    _run(eng, cache, ids, 0)
    floor = cache.truncate_floor()
    assert 0 < floor < len(ids)
    with pytest.raises(KVCacheReuseError):
        cache.truncate(floor - 1)
    snap = cache.snapshot()
    cache.truncate(floor)
    assert cache.seq_length == floor and snap.tokens == len(ids)  # the snapshot is unchanged


# -- isolation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fp_engine", "tiered_engine"])
def test_concurrent_requests_do_not_see_each_others_writes(which, request):
    eng = request.getfixturevalue(which)
    eng.prefix_cache.clear()
    base = eng.encode(STORY)
    eng.generate(base, GenerationConfig(max_new_tokens=1))  # caches the shared prefix
    held = [a for e in eng.prefix_cache._entries for a in e.arrays()]  # the cached state's own arrays
    frozen = [a.copy() for a in held]
    suffixes = [" Lily", " The dog", " Her mom said", " A bird sang", " Tom ran"]
    prompts = [base + eng.encode(s)[1:] for s in suffixes]
    expected = [eng.generate(p, GenerationConfig(max_new_tokens=16), context=_ctx(p, cache_prompt=False)).token_ids
                for p in prompts]
    got: dict[int, list] = {}
    errors = []

    def work(i):
        try:
            for _ in range(2):
                r = eng.generate(prompts[i], GenerationConfig(max_new_tokens=16),
                                 context=_ctx(prompts[i], quality_budget=2.0))
                got.setdefault(i, []).append((r.stats.cache_n, r.token_ids))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert any(n > 0 for runs in got.values() for n, _ in runs)
    if which == "fp_engine":  # exact: the same tokens as without the cache
        for i, runs in got.items():
            assert all(toks == expected[i] for _, toks in runs), i
    else:  # tiered: each reuse of one state gives the same tokens
        for i, runs in got.items():
            reused = {tuple(t) for n, t in runs if n >= len(base) - 1}
            assert len(reused) <= 1, i
    # the cached state the threads restored from was never written
    assert held and all(np.array_equal(a, b) for a, b in zip(held, frozen))


# -- memory -------------------------------------------------------------------------------------
def test_lru_eviction_under_the_byte_limit(fp_engine):
    eng = fp_engine
    seqs = [eng.encode(f"Story number {i}. " + STORY) for i in range(4)]
    bpt = int(eng.spec.kv_bytes_per_token(4))
    one = max(len(s) for s in seqs) * bpt
    pc = PrefixCache(max_bytes=int(2.5 * one))
    for s in seqs[:2]:
        c = _new_cache(eng)
        _run(eng, c, s, 0)
        pc.store(pc.begin(s, _new_cache(eng), budget_ppl=1), c, s, len(s))
    # touch the first so the second is the least recently used
    assert pc.begin(seqs[0] + [5], _new_cache(eng), budget_ppl=1).start == len(seqs[0])
    for s in seqs[2:]:
        c = _new_cache(eng)
        _run(eng, c, s, 0)
        pc.store(pc.begin(s, _new_cache(eng), budget_ppl=1), c, s, len(s))
    st = pc.stats()
    assert st.bytes_held <= pc.max_bytes and st.evictions >= 1
    assert pc.begin(seqs[1] + [5], _new_cache(eng), budget_ppl=1).start < len(seqs[1])  # evicted
    assert pc.begin(seqs[3] + [5], _new_cache(eng), budget_ppl=1).start == len(seqs[3])  # kept
    # the resource-manager interface
    held = pc.bytes_held
    freed = pc.evict_lru(1)
    assert freed > 0 and pc.bytes_held == held - freed
    with pytest.raises(ValueError, match="max_bytes"):
        pc.set_max_bytes(-1)
    assert pc.max_bytes == int(2.5 * one)  # the rejected limit left the old one
    pc.set_max_bytes(0)
    assert pc.bytes_held == 0 and not pc.enabled


def test_opt_out_neither_reuses_nor_stores(fp_engine):
    eng = fp_engine
    eng.prefix_cache.clear()
    ids = eng.encode(STORY)
    eng.generate(ids, GenerationConfig(max_new_tokens=2), context=_ctx(ids, cache_prompt=False))
    assert eng.prefix_cache.stats().entries == 0
    eng.generate(ids, GenerationConfig(max_new_tokens=2))
    r = eng.generate(ids, GenerationConfig(max_new_tokens=2), context=_ctx(ids, cache_prompt=False))
    assert r.stats.cache_n == 0
    assert eng.generate(ids, GenerationConfig(max_new_tokens=2)).stats.cache_n == len(ids) - 1
    assert eng.generate(ids, GenerationConfig(max_new_tokens=2), baseline=True).stats.cache_n == 0


def test_retokenized_history_reuses_the_common_prefix(fp_engine):
    eng = fp_engine
    eng.prefix_cache.clear()
    ids = eng.encode(STORY)
    r = eng.generate(ids, GenerationConfig(max_new_tokens=10, stop_on_eos=False))
    fed = ids + r.token_ids[:-1]
    # the "template" re-rendered the reply differently after its 3rd token
    changed = fed[: len(ids) + 3] + [(fed[len(ids) + 3] + 1) % eng.spec.vocab_size] + eng.encode(" ok")[1:]
    before = eng.prefix_cache.stats().retokenize_mismatches
    res = eng.generate(changed, GenerationConfig(max_new_tokens=2))
    assert res.stats.cache_n == len(ids) + 3
    assert eng.prefix_cache.stats().retokenize_mismatches == before + 1


# -- metrics ----------------------------------------------------------------------------------
def test_agent_metrics_report_hit_rate_bytes_and_evictions():
    from lemonade_inferos.agent.metrics import Report, window_sections

    def payload(i, cache_n, held, ev):
        return {"instance": "a", "start_time": 100.0 + i, "end_time": 101.0 + i, "prompt_tokens": 100,
                "cache_n": cache_n, "prefix_cache": {"enabled": True, "bytes_held": held, "bytes_saved": held // 2,
                                                     "evictions": ev}}

    reports = [Report.from_payload(payload(i, n, 1000 * (i + 1), i), id=i, received_at=200.0)
               for i, n in enumerate([0, 90, 80, 0])]
    m = window_sections(reports, 200.0, 300.0, [])
    assert m["kv_stats"]["hit_rate"] == 0.5 and m["memory"]["kv_cache_hit_rate"] == 0.5
    assert m["kv_stats"]["token_hit_rate"] == pytest.approx(170 / 400)
    assert m["memory"]["prefix_cache_mb"] == pytest.approx(4000 / 1e6)  # the newest report's bytes
    assert m["kv_stats"]["prefix_cache_evictions"] == 3


# -- a real inferos serve process ---------------------------------------------------------------
PORT = 7761


@pytest.fixture(scope="module")
def serve_process(embedded_model):
    env = {**os.environ, "INFEROS_CACHE_DIR": os.environ["INFEROS_CACHE_DIR"]}
    env.pop("INFEROS_AGENT_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "lemonade_inferos.cli", "serve", "-m", str(embedded_model),
                             "--port", str(PORT), "--prefix-cache-bytes", "64MiB"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"inferos serve did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    yield f"http://127.0.0.1:{PORT}/v1"
    proc.terminate()
    proc.wait(10)


def test_cache_n_through_a_real_serve_process(serve_process):
    from openai import OpenAI

    client = OpenAI(base_url=serve_process, api_key="none")
    # a system prompt long enough that the default (tiered) store quantizes part of it in
    # the first prefill, so the state's quality cost is measured there (see prefix_cache)
    msgs = [{"role": "system", "content": "You tell short stories about Lily and her dog. " + STORY},
            {"role": "user", "content": "Tell me a story."}]
    r1 = client.chat.completions.create(model="m", messages=msgs, max_tokens=16, temperature=0)
    t1 = r1.model_extra["timings"]
    assert t1["cache_n"] == 0 and t1["prompt_n"] == r1.usage.prompt_tokens
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And then?"}]
    r2 = client.chat.completions.create(model="m", messages=msgs, max_tokens=16, temperature=0)
    t2 = r2.model_extra["timings"]
    assert t2["cache_n"] > r1.usage.prompt_tokens // 2
    assert t2["prompt_n"] + t2["cache_n"] == r2.usage.prompt_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens == t2["cache_n"]
    r3 = client.chat.completions.create(model="m", messages=msgs, max_tokens=16, temperature=0,
                                        extra_body={"cache_prompt": False})
    assert r3.model_extra["timings"]["cache_n"] == 0
    c = client.completions.create(model="m", prompt="Lily had a dog named Max. Max liked to", max_tokens=4)
    c2 = client.completions.create(model="m", prompt="Lily had a dog named Max. Max liked to run and", max_tokens=4)
    assert c.model_extra["timings"]["cache_n"] == 0 and c2.model_extra["timings"]["cache_n"] > 5


# -- the Lemonade in-process path -------------------------------------------------------------
def test_lemonade_runtime_reuses_the_previous_turn(embedded_model, monkeypatch):
    """What the patched ``OrtGenaiModel.generate`` runs: a follow-up call whose input ids
    extend the previous call's prompt + output starts from its KV state."""
    from lemonade_inferos.integrations.lemonade import LemonadeRuntime

    monkeypatch.delenv("INFEROS_AGENT_URL", raising=False)
    rt = LemonadeRuntime(str(embedded_model))
    assert rt.engine is not None, rt.kv_inactive_reason

    class Model:  # the attributes Lemonade's OrtGenaiModel carries
        config = {"search": {"do_sample": False}}

    ids = rt.engine.encode(STORY)
    out = rt.generate(Model(), None, {"input_ids": ids, "max_new_tokens": 12})[0].tolist()
    follow = out[:-1] + rt.engine.encode(" Then she went home.")[1:]
    rt.generate(Model(), None, {"input_ids": follow, "max_new_tokens": 4})
    st = rt.engine.prefix_cache.stats()
    assert st.hits == 1 and st.hit_tokens >= len(ids)


def test_prometheus_exposes_prefix_cache(tmp_path):
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    from lemonade_inferos.agent.server import BackgroundAgent
    from lemonade_inferos.types import PrefixCacheStats, RunStats

    token, now = "pc-token-" + "p" * 24, 1_900_000_000.0
    with BackgroundAgent(state_dir=tmp_path, token=token, clock=lambda: now) as agent:
        for i, n in enumerate([0, 50, 60]):
            pc = PrefixCacheStats(enabled=True, lookups=i + 1, hits=min(i, 2), bytes_held=1_000_000 * (i + 1),
                                  logical_bytes=3_000_000 * (i + 1), evictions=i)
            s = RunStats(request_id=f"r{i}", start_time=now - 10 + i, end_time=now - 9 + i, prompt_tokens=100,
                         generated_tokens=4, cache_n=n, prefix_cache=pc)
            r = requests.post(agent.url + "/v1/stats", json={**s.to_dict(), "instance": "x"},
                              headers={"X-Inferos-Token": token})
            assert r.status_code == 201, r.text
        m = requests.get(agent.url + "/v1/metrics").json()
        assert m["kv_stats"]["hit_rate"] == m["memory"]["kv_cache_hit_rate"] == pytest.approx(2 / 3, abs=1e-4)
        assert m["memory"]["prefix_cache_mb"] == pytest.approx(3.0) and m["memory"]["prefix_cache_saved_mb"] == pytest.approx(6.0)
        text = requests.get(agent.url + "/v1/metrics/prometheus").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["inferos_kv_cache_hit_ratio"].samples[0].value == pytest.approx(2 / 3, abs=1e-3)
    assert fams["inferos_prefix_cache_bytes"].samples[0].value == pytest.approx(3_000_000)
    assert fams["inferos_prefix_cache_evictions"].samples[0].value == 2
    assert fams["inferos_prefix_cache_retokenize_mismatches"].samples[0].value == 0
