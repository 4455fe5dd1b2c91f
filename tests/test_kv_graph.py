"""The tiered graph dequantizes exactly what the store holds (every layout and level)."""

import shutil

import numpy as np
import onnxruntime as ort
import pytest

from lemonade_inferos.kv.graph import GraphLayout, write_tiered_graph
from lemonade_inferos.kv.quantize import dequantize
from lemonade_inferos.kv.store import StoreConfig, TieredKVCache, pack_half, store_for_scheme, unpack_half
from lemonade_inferos.model.embedded import embedded_model_dir, embedded_source_files
from lemonade_inferos.model.spec import DecoderSpec


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    dst = tmp_path_factory.mktemp("g") / "stories260K"
    shutil.copytree(embedded_model_dir(), dst)
    write_tiered_graph(embedded_source_files()[0], dst)
    return DecoderSpec.from_folder(dst)


def test_pack_half_roundtrip():
    x = np.random.default_rng(0).integers(0, 16, 64).astype(np.uint8)
    p = pack_half(x)
    assert p.shape == (32,) and p[0] == x[0] | (x[32] << 4)
    assert np.array_equal(unpack_half(p), x)


def _sess(spec, f, cache={}):
    if f not in cache:
        cache[f] = ort.InferenceSession(str(spec.folder / f), providers=["CPUExecutionProvider"])
    return cache[f]


def _fp_past(c: TieredKVCache) -> dict[str, np.ndarray]:
    """The float32 past the tiered graph should see (graph order: L0, L1, L2), per layer."""
    L, KV, D, E = c.L, c.KV, c.D, c.E
    parts = {k: [c._l0[k][: c._n0].astype(np.float32).transpose(1, 0, 2)] for k in ("key", "value")}  # [L, N0, E]
    for level in c.config.levels:
        t = c._tiers[level]
        for k in ("key", "value"):
            codes, scale, zero = c._canonical(t, k)
            mode, g = c._modes[k]
            parts[k].append(dequantize(codes, scale, zero, axis=1 if mode == "channel" else 2, group=g))
    s = c.spec
    out = {}
    for k, name in (("key", s.past_key_name), ("value", s.past_value_name)):
        x = np.concatenate(parts[k], axis=1).reshape(L, -1, KV, D).transpose(0, 2, 1, 3)  # [L, KV, P, D]
        for i in range(L):
            out[name % i] = np.ascontiguousarray(x[i:i + 1])
    return out


CONFIGS = {
    "default": None,
    "q8_0": "q8_0",
    "q4_0": "q4_0",
    "hf_quantized": "hf_quantized",
    "int8+int4": StoreConfig(block_len=16, key_group=16, sink_tokens=4, recent_window=16,
                             thresholds=(0.0, 0.5, 1.0)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_graph_matches_numpy_dequant(spec, name, sessions=None):
    cfg = CONFIGS[name]
    if cfg is None:
        c = store_for_scheme("tiered", spec)
    elif isinstance(cfg, str):
        c = store_for_scheme(cfg, spec)
    else:
        c = TieredKVCache(spec, None, cfg)
    ids = [1] + [int(x) for x in np.random.default_rng(1).integers(2, 512, 299)]
    sessions = {} if sessions is None else sessions
    s = _sess(spec, c.graph_file, sessions)
    outs = ["logits"] + c.output_names()
    for pos, t in enumerate(ids):  # token by token, re-tiering as it goes
        feeds = dict(input_ids=np.array([[t]], np.int64), attention_mask=c.attention_mask(1).copy(),
                     position_ids=np.array([[pos]], np.int64), **c.past_inputs())
        r = s.run(outs, feeds)
        c.update(dict(zip(outs[1:], r[1:])), 1)
    assert sum(len(c._tiers[v].blocks) for v in c.config.levels) > 0
    nxt = dict(input_ids=np.array([[5]], np.int64), attention_mask=c.attention_mask(1).copy(),
               position_ids=np.array([[len(ids)]], np.int64))
    got = s.run(["logits"], {**nxt, **c.past_inputs()})[0]
    fp = _fp_past(c)
    nxt["attention_mask"] = np.ones((1, next(iter(fp.values())).shape[2] + 1), np.int64)
    ref = _sess(spec, "model.onnx", sessions).run(["logits"], {**nxt, **fp})[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_layout_levels_and_checks():
    assert GraphLayout().levels == (2,)
    assert StoreConfig().levels == (2,)  # the default preset never keeps a block at INT8
    assert StoreConfig(thresholds=(0.0, 0.5, 1.0)).levels == (1, 2)
    assert StoreConfig(mode="quality_optimized").levels == (1,)
    assert StoreConfig(mode="disabled").levels == ()
    assert StoreConfig(budget_bytes=1000).levels == (1, 2)
    with pytest.raises(ValueError):
        GraphLayout(value_group=12).check(4, 8)  # neither divides nor spans whole heads


@pytest.mark.parametrize("name", ["default", "hf_quantized", "int8+int4", "q4_0"])
def test_split_before_dequant_graph_matches_numpy_dequant(tmp_path, monkeypatch, name):
    """Models with kv_heads*head_dim >= 128 split the quantized tiers into layers before
    dequantizing; force that graph on stories260K and check it dequantizes exactly what
    the store holds."""
    import lemonade_inferos.kv.graph as G

    monkeypatch.setattr(G, "split_before_dequant", lambda kv, d: True)
    dst = tmp_path / "stories260K"
    shutil.copytree(embedded_model_dir(), dst)
    for f in dst.glob("model_tiered*.onnx"):
        f.unlink()
    write_tiered_graph(embedded_source_files()[0], dst)
    sp = DecoderSpec.from_folder(dst)
    test_graph_matches_numpy_dequant(sp, name, {})
    import onnx

    m = onnx.load(str(dst / "model_tiered.onnx"))
    assert any(n.name.endswith("dq_4/DequantizeLinear") for n in m.graph.node)
