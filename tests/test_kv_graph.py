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
    L, KV, D = c.L, c.KV, c.D
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


def test_nibble_unpack_exact():
    """The uint8 unpack of the L2 code bytes (DequantizeLinear -> QuantizeLinear, Mul, Sub)
    gives byte >> 4 and byte & 15 for every byte value."""
    from onnx import TensorProto, helper

    from lemonade_inferos.kv.graph import TieredKVAdapter
    from lemonade_inferos.model.export import GraphBuilder
    from types import SimpleNamespace

    b = GraphBuilder(SimpleNamespace(n_layers=1, n_kv_heads=1, head_size=2), "t")
    ad = TieredKVAdapter()
    ad._nib = (b.initializer("m", np.array(15, np.uint8)), b.initializer("s", np.array(4, np.uint8)))
    x = b.add_input("x", TensorProto.UINT8, ["n"])
    out = ad._nibbles(b, x, "t", fast=True)
    b.add_output(out["value"], TensorProto.UINT8, ["n"])
    b.add_output(out["key"], TensorProto.UINT8, ["n"])
    g = helper.make_graph(b.nodes, "t", b.inputs, b.outputs, b.initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    byte = np.arange(256, dtype=np.uint8)
    hi, lo = s.run(None, {"x": byte})
    assert np.array_equal(hi, byte >> 4) and np.array_equal(lo, byte & 15)


def test_attn_mass_reduced_per_layer(spec):
    """Each layer reduces its probabilities right away (ReduceSum next to the softmax) and
    the next layer's key Concat depends on that reduction (so a prefill frees every
    layer's [H, S, T] probabilities before the next layer); kv.attn_mass sums to
    layers * heads * S (each query's probabilities sum to 1)."""
    import onnx

    from lemonade_inferos.kv.graph import ATTN_MASS

    m = onnx.load(str(spec.folder / "model_tiered.onnx"), load_external_data=False)
    red = [n for n in m.graph.node if n.op_type == "ReduceSum" and n.name.startswith("/kv/mass_")]
    assert len(red) == spec.num_layers
    deps = [n for n in m.graph.node if n.op_type == "Gather" and n.name.startswith("/kv/mass_dep_")]
    assert len(deps) == spec.num_layers - 1
    consumers = {i for n in m.graph.node if n.op_type == "Concat" for i in n.input}
    assert all(d.output[0] in consumers for d in deps)
    c = TieredKVCache(spec, None, StoreConfig(mode="disabled", sink_tokens=0, recent_window=0))
    s = _sess(spec, c.graph_file)
    S = 7
    feeds = dict(input_ids=np.arange(1, S + 1, dtype=np.int64)[None], attention_mask=c.attention_mask(S).copy(),
                 position_ids=np.arange(S, dtype=np.int64)[None], **c.past_inputs())
    mass = s.run([ATTN_MASS], feeds)[0]
    assert mass.shape == (c.past_length + S,)
    assert abs(float(mass.sum()) - spec.num_layers * spec.num_heads * S) < 1e-3 * S
