"""The generation loop on the real embedded model through real onnxruntime sessions."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lemonade_inferos.engine import ContextLengthError, Engine, GenerationConfig
from lemonade_inferos.hookspecs import hookimpl
from lemonade_inferos.model.llama2c import load_llama2c
from lemonade_inferos.model.reference import greedy
from lemonade_inferos.plugins import get_plugin_manager
from lemonade_inferos.policy import load_policy


class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def before_request(self, context, policy):
        self.events.append(("before", context.prompt_tokens))

    @hookimpl
    def after_request(self, context, stats):
        self.events.append(("after", stats))

    @hookimpl
    def on_request_error(self, context, error):
        self.events.append(("error", error))


@pytest.fixture(scope="module")
def engine(embedded_model):
    return Engine(embedded_model, pm=get_plugin_manager(entry_points=False), policy=load_policy("quality"))


def test_greedy_matches_numpy_reference(engine, stories_paths):
    weights = load_llama2c(stories_paths[0])
    prompt = engine.encode("Once upon a time")
    ref = greedy(weights, prompt, 20)
    ref = ref[len(prompt):] if len(ref) > 20 else ref
    res = engine.generate(prompt, GenerationConfig(max_new_tokens=20), baseline=True)
    assert res.token_ids == list(ref)[:20]
    assert res.text.startswith(", there was a little girl named Lily.")


def test_hooks_fire_and_stats_are_measured(embedded_model):
    rec = Recorder()
    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False, extra=[("rec", rec)]))
    res = eng.generate("Once upon a time", GenerationConfig(max_new_tokens=30))
    kinds = [e[0] for e in rec.events]
    assert kinds == ["before", "after"]
    st = rec.events[1][1]
    assert st is res.stats
    assert st.generated_tokens == len(res.token_ids) == 30
    assert st.prompt_tokens == len(res.prompt_ids)
    assert 0 < st.ttft_ms <= st.total_ms
    assert st.decode_tps > 0 and st.peak_rss_bytes > 10 * 2**20
    assert st.prompt_nll is not None and 0 < st.prompt_nll < 5
    assert st.kv.tokens == len(res.prompt_ids) + 30 - 1  # the last token is never fed back
    assert st.end_time >= st.start_time
    assert st.finish_reason == "length"


def test_baseline_runs_no_hooks_and_fp32_cache(embedded_model):
    rec = Recorder()
    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False, extra=[("rec", rec)]))
    res = eng.generate("Once upon a time", GenerationConfig(max_new_tokens=10), baseline=True)
    assert rec.events == []
    spec = eng.spec
    tokens = len(res.prompt_ids) + 9
    assert res.stats.kv.total_bytes == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * tokens
    assert res.stats.kv.store == "fp32" and res.stats.baseline


def test_error_hook_fires_and_error_propagates(embedded_model):
    rec = Recorder()

    class Exploding:
        @hookimpl
        def run_options(self, policy, context):
            raise RuntimeError("run options exploded")

    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False, extra=[("rec", rec), ("x", Exploding())]))
    with pytest.raises(RuntimeError, match="exploded"):
        eng.generate("Hi", GenerationConfig(max_new_tokens=3))
    assert [e[0] for e in rec.events] == ["before", "error"]


def test_prompt_longer_than_context_is_a_clear_error(engine):
    ids = [1] + [300] * engine.spec.context_length
    with pytest.raises(ContextLengthError, match=r"513 tokens .* context is 512"):
        engine.generate(ids)


def test_generation_stops_at_context_length(engine):
    ids = engine.encode("Once upon a time") + [300] * 500
    res = engine.generate(ids, GenerationConfig(max_new_tokens=100), baseline=True)
    assert len(ids) + len(res.token_ids) == engine.spec.context_length
    assert res.finish_reason == "length"


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                          ("top_k", -2), ("repetition_penalty", 0.5)])
def test_bad_generation_settings_name_the_field(engine, field, value):
    with pytest.raises(ValueError, match=field):
        engine.generate("Hi", GenerationConfig(**{field: value}))


def test_streaming_pieces_equal_text_and_stop_string_is_never_emitted(engine):
    pieces = []
    full = engine.generate("Once upon a time", GenerationConfig(max_new_tokens=40), baseline=True).text
    assert "Lily" in full
    res = engine.generate("Once upon a time", GenerationConfig(max_new_tokens=40, stop=["Lily"]),
                          on_token=lambda t, p: pieces.append(p), baseline=True)
    assert res.finish_reason == "stop"
    assert res.text == full[: full.index("Lily")]
    assert "".join(pieces) == res.text
    assert "Lil" not in "".join(pieces)


def test_on_token_false_and_cancel_event_stop_generation(engine):
    res = engine.generate("Once upon a time", GenerationConfig(max_new_tokens=50),
                          on_token=lambda t, p: False if t >= 0 else None)
    assert res.finish_reason == "cancelled" and len(res.token_ids) == 1
    ev = threading.Event()
    n = []

    def cb(t, p):
        n.append(t)
        if len(n) == 5:
            ev.set()

    res = engine.generate("Once upon a time", GenerationConfig(max_new_tokens=50), on_token=cb, cancel=ev)
    assert res.finish_reason == "cancelled" and len(res.token_ids) == 5


def test_sampling_is_reproducible_by_seed(engine):
    cfg = dict(max_new_tokens=30, temperature=1.0, top_k=40, top_p=0.95, repetition_penalty=1.1)
    a = engine.generate("Once upon a time", GenerationConfig(seed=7, **cfg), baseline=True).token_ids
    b = engine.generate("Once upon a time", GenerationConfig(seed=7, **cfg), baseline=True).token_ids
    c = engine.generate("Once upon a time", GenerationConfig(seed=8, **cfg), baseline=True).token_ids
    assert a == b and a != c


def test_iobinding_off_gives_the_same_tokens(engine):
    on = engine.generate("Tom had a ball", GenerationConfig(max_new_tokens=25), baseline=True)
    pol = load_policy("quality").merged({"io": {"enable_iobinding": False}, "kv": {"mode": "disabled"}})
    off = engine.generate("Tom had a ball", GenerationConfig(max_new_tokens=25), policy=pol)
    assert on.token_ids == off.token_ids


def test_iobinding_off_gives_the_same_tokens_with_the_tiered_store(engine):
    """The decode loop keeps one IOBinding and rebinds only changed objects (in-place
    updated buffers stay bound); across re-tiering (tier arrays replaced) it must produce
    exactly what plain session.run does."""
    cfg = GenerationConfig(max_new_tokens=200)
    on = engine.generate("Tom had a ball", cfg, policy=load_policy("default"))
    off = engine.generate("Tom had a ball", cfg,
                          policy=load_policy("default").merged({"io": {"enable_iobinding": False}}))
    assert on.stats.kv.blocks >= 2 and on.stats.kv.tokens_evicted > 0  # re-tiered, evicted
    assert on.token_ids == off.token_ids


def test_sessions_are_cached_by_session_affecting_fields(embedded_model):
    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False))
    base = load_policy("default").merged({"kv": {"mode": "disabled"}})
    s1 = eng.session("model.onnx", base)
    s2 = eng.session("model.onnx", base.merged({"kv": {"recent_window": 128}, "quality": {"max_delta_ppl": 0.1}}))
    s3 = eng.session("model.onnx", base.merged({"runtime": {"intra_op_threads": 1}}))
    assert s1 is s2 and s1 is not s3


def test_teacher_forced_cached_path_matches_prefill(engine):
    from lemonade_inferos.kv.base import FullPrecisionKVCache

    ids = engine.encode("The cat sat on the mat. It was a sunny day.")
    stepwise = engine.teacher_forced_logits(ids, FullPrecisionKVCache(engine.spec))
    sess = engine.session("model.onnx", load_policy("quality"))
    import onnxruntime as ort

    full = engine._run(sess, FullPrecisionKVCache(engine.spec), np.array([ids]), 0, ort.RunOptions(), True)
    np.testing.assert_allclose(stepwise, full, atol=1e-4)


def test_oga_backend_drives_the_same_folder(embedded_model):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False), backend="oga")
    ort_eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False))
    a = eng.generate("Once upon a time", GenerationConfig(max_new_tokens=20))
    b = ort_eng.generate("Once upon a time", GenerationConfig(max_new_tokens=20), baseline=True)
    assert a.token_ids == b.token_ids
    assert a.stats.backend == "oga" and a.stats.kv.active is False
    assert any("KV store not active" in n for n in a.stats.notes)
    assert og is not None


def test_deadline_terminates_generation_and_keeps_tokens(engine):
    from lemonade_inferos.types import InferenceContext

    slow = {"n": 0}

    def on_token(t, p):  # stand-in for a big model: 2 ms per token
        import time

        slow["n"] += 1
        time.sleep(0.002)

    ids = engine.encode("Once upon a time")
    ctx = InferenceContext(model="m", prompt_tokens=len(ids), max_new_tokens=400, deadline_ms=60)
    res = engine.generate(ids, GenerationConfig(max_new_tokens=400, stop_on_eos=False), on_token=on_token, context=ctx)
    assert res.finish_reason == "deadline"
    assert 0 < len(res.token_ids) < 400 and len(res.token_ids) == slow["n"]
    assert res.stats.total_ms < 400
    # without a deadline the same request runs to the token limit
    res = engine.generate(ids, GenerationConfig(max_new_tokens=60, stop_on_eos=False))
    assert res.finish_reason == "length" and len(res.token_ids) == 60


def test_run_options_terminate_stops_a_model_run_in_flight(engine):
    """The mechanism the deadline uses: a RunOptions with terminate set makes ORT refuse."""
    import onnxruntime as ort

    from lemonade_inferos.kv.base import FullPrecisionKVCache

    ro = ort.RunOptions()
    ro.terminate = True
    sess = engine.session("model.onnx", load_policy("quality"))
    with pytest.raises(Exception, match="(?i)terminat"):
        engine._run(sess, FullPrecisionKVCache(engine.spec), np.array([[1, 400, 401]]), 0, ro, True)


def test_oga_backend_applies_stop_strings_like_the_ort_loop(embedded_model):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    oga = Engine(embedded_model, pm=get_plugin_manager(entry_points=False), backend="oga")
    ort_eng = Engine(embedded_model, pm=get_plugin_manager(entry_points=False))
    cfg = GenerationConfig(max_new_tokens=40, stop=["Lily"])
    pieces = []
    a = oga.generate("Once upon a time", cfg, on_token=lambda t, p: pieces.append(p))
    b = ort_eng.generate("Once upon a time", cfg, baseline=True)
    assert a.finish_reason == b.finish_reason == "stop"
    assert a.text == b.text and "Lily" not in a.text
    assert "".join(pieces) == a.text and "Lil" not in "".join(pieces)
