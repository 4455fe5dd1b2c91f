import shutil

import numpy as np
import onnxruntime as ort
import pytest

from lemonade_inferos.kv.base import FullPrecisionKVCache
from lemonade_inferos.kv.graph import write_tiered_graph
from lemonade_inferos.kv.store import StoreConfig, TieredKVCache, store_for_scheme
from lemonade_inferos.model.embedded import embedded_model_dir, embedded_source_files
from lemonade_inferos.model.spec import DecoderSpec


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    src = embedded_model_dir()
    dst = tmp_path_factory.mktemp("m") / "stories260K"
    shutil.copytree(src, dst)
    write_tiered_graph(embedded_source_files()[0], dst)
    return DecoderSpec.from_folder(dst)


_S = {}


def _run(spec, cache, ids, prefill):
    f = cache.graph_file
    if f not in _S:
        _S[f] = ort.InferenceSession(str(spec.folder / f), providers=["CPUExecutionProvider"])
    s, outs, logits, pos = _S[f], ["logits"] + cache.output_names(), [], 0
    for ch in [ids[:prefill]] + [[t] for t in ids[prefill:]]:
        n = len(ch)
        m = cache.attention_mask(n)
        m = np.ones((1, cache.past_length + n), np.int64) if m is None else m.copy()
        feeds = dict(input_ids=np.array([ch], np.int64), attention_mask=m,
                     position_ids=np.arange(pos, pos + n, dtype=np.int64)[None], **cache.past_inputs())
        r = s.run(outs, feeds)
        cache.update(dict(zip(outs[1:], r[1:])), n)
        logits.append(r[0][0])
        pos += n
    return np.concatenate(logits)


IDS = [1] + [int(x) for x in np.random.default_rng(0).integers(2, 512, 150)]


def test_fp16_tiered_matches_standard(spec):
    ref = _run(spec, FullPrecisionKVCache(spec), IDS, 20)
    c = store_for_scheme("fp16", spec)
    got = _run(spec, c, IDS, 20)
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max()) + 1e-2
    assert c.stats().level_distribution["L0"] == len(IDS) * spec.num_layers


def test_int8_close(spec):
    ref = _run(spec, FullPrecisionKVCache(spec), IDS, 8)
    c = TieredKVCache(spec, None, StoreConfig(block_len=16, key_group=16, sink_tokens=4, recent_window=16,
                                              thresholds=(0.0, 1.0, 1.0)))
    got = _run(spec, c, IDS, 8)
    st = c.stats()
    assert st.level_distribution["L1"] > 0 and st.bytes_by_tier["L1_int8"] > 0
    p = np.exp(ref - ref.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    lq = got - got.max(-1, keepdims=True); lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    lp = np.log(p)
    assert float((p * (lp - lq)).sum(-1).mean()) < 1e-3


def test_sinks_and_recent_never_evicted_and_budget(spec):
    cfg = StoreConfig(block_len=16, key_group=16, sink_tokens=4, recent_window=16, thresholds=(0.0, 0.0, 0.3),
                      budget_bytes=40_000)
    c = TieredKVCache(spec, None, cfg)
    _run(spec, c, IDS, 30)
    st = c.stats()
    assert st.tokens_evicted > 0
    kept = set(c._l0_tok[: c._n0].tolist())
    T = len(IDS)
    assert set(range(4)) <= kept and set(range(T - 16, T)) <= kept
    fixed = (4 + (T - 4 - c._formed * 16)) * c.row_bytes
    assert fixed <= cfg.budget_bytes and st.total_bytes <= cfg.budget_bytes
    assert st.total_bytes == sum(st.bytes_by_tier.values())
    assert st.compression_vs_fp16 > 1


def test_schemes_and_bad_config(spec):
    for name in ("q8_0", "q4_0", "hf_quantized", "tiered"):
        c = store_for_scheme(name, spec)
        _run(spec, c, IDS, 10)
        st = c.stats()
        assert st.total_bytes < st.fp16_bytes or (name == "hf_quantized" and st.tokens < 192)
    with pytest.raises(ValueError):
        store_for_scheme("nope", spec)
    with pytest.raises(ValueError):
        TieredKVCache(spec, None, StoreConfig(block_len=15))


def test_output_buffers_decode_matches(spec):
    """Decode steps through the engine write kv.new / kv.attn_mass into the store's
    buffers (KVCache.output_buffers); results equal the run without them."""
    from lemonade_inferos.engine import Engine
    from lemonade_inferos.ort_options import prime_run_options
    from lemonade_inferos.plugins import get_plugin_manager
    from lemonade_inferos.policy import load_policy

    pol = load_policy("default")
    eng = Engine(spec.folder, pm=get_plugin_manager(entry_points=False), policy=pol)
    ro = prime_run_options(ort.RunOptions())
    res = []
    for bufs in (True, False):
        c = TieredKVCache(spec, pol)
        if not bufs:
            c.output_buffers = lambda n: None
        else:
            assert c.output_buffers(4) is None and set(c.output_buffers(1)) == set(c.output_names())
        sess = eng.session(c.graph_file, pol)
        logits = [eng._run(sess, c, np.array([IDS[:40]], np.int64), 0, ro, True)]
        for i, t in enumerate(IDS[40:]):
            logits.append(eng._run(sess, c, np.array([[t]], np.int64), 40 + i, ro, True))
        res.append((np.concatenate(logits), c.stats(), c._tok_mass.copy()))
    assert np.array_equal(res[0][0], res[1][0])
    assert res[0][1] == res[1][1]
    assert np.array_equal(res[0][2], res[1][2])


@pytest.mark.parametrize("scheme", ["tiered", "q8_0", "hf_quantized"])
def test_quantize_from_l0_matches_reference(spec, scheme):
    """Blocks leaving L0 are quantized straight from the channel-major buffer; codes,
    scales and zero points must equal quantize() on the canonical [L, n, E] form."""
    from lemonade_inferos.kv.quantize import quantize

    c = store_for_scheme(scheme, spec)
    L, E, bl = c.L, c.E, c.config.block_len
    rng = np.random.default_rng(5)
    buf = (rng.standard_normal((2 * L, E, 3 * bl)) * 3).astype(np.float16)
    x = buf[:, :, 7:7 + bl]  # a strided view, as the store slices its L0 buffer
    for kind, part in (("key", x[:L]), ("value", x[L:])):
        mode, g = c._modes[kind]
        for bits in (4, 8):
            q, s, z = c._quantize_cm(part, kind, bits)
            ref = quantize(part.transpose(0, 2, 1).astype(np.float32), bits,
                           axis=1 if mode == "channel" else 2, group=g)
            np.testing.assert_array_equal(q, ref.q.transpose(0, 2, 1))
            np.testing.assert_array_equal(s, ref.scale.transpose(0, 2, 1))
            np.testing.assert_array_equal(z, ref.zero.transpose(0, 2, 1))
    for bits in (4, 8):  # both kinds in one pass (what re-tiering uses) == kind by kind
        both = c._quantize_l0_block(x, bits)
        for kind, part in (("key", x[:L]), ("value", x[L:])):
            for got, want in zip(both[kind], c._quantize_cm(part, kind, bits)):
                np.testing.assert_array_equal(got, want)
    bad = x[:L].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        c._quantize_cm(bad, "key", 4)
