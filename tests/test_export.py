"""ONNX decoder export vs the numpy reference, cached decode, og generation, conversion."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lemonade_inferos.model import reference as R
from lemonade_inferos.model.convert import MANIFEST, convert_llama2c
from lemonade_inferos.model.export import (
    FLOAT, IR_VERSION, OPSET, GraphBuilder, KVGraphAdapter, StandardKVAdapter, build_decoder)
from lemonade_inferos.model.spec import DecoderSpec

from test_model_llama2c import STORY


@pytest.fixture(scope="module")
def session(weights):
    m = build_decoder(weights)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def empty_past(c, batch=1):
    z = np.zeros((batch, c.n_kv_heads, 0, c.head_size), np.float32)
    return {f"past_key_values.{i}.{kv}": z for i in range(c.n_layers) for kv in ("key", "value")}


def run(sess, ids, past, past_len, mask=None, pos=None):
    ids = np.asarray(ids, np.int64).reshape(1, -1)
    n = ids.shape[1]
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((1, past_len + n), np.int64) if mask is None else mask,
        "position_ids": np.arange(past_len, past_len + n)[None] if pos is None else pos,
        **past,
    }
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    new_past = {k.replace("present", "past_key_values"): v for k, v in outs.items() if k != "logits"}
    return outs["logits"], new_past


def test_graph_is_valid_and_small(weights):
    m = build_decoder(weights)
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version == OPSET and m.ir_version == IR_VERSION
    assert {o.domain for o in m.graph.node} <= {""}  # standard ops only
    names_in = [i.name for i in m.graph.input]
    names_out = [o.name for o in m.graph.output]
    assert names_in[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names_in[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert names_out[:3] == ["logits", "present.0.key", "present.0.value"]
    per_layer = len(m.graph.node) / weights.config.n_layers
    print(f"graph nodes: {len(m.graph.node)} (~{per_layer:.0f} per layer)")
    assert per_layer < 50


def test_logits_match_reference(weights, tok, session):
    ids = tok.encode(STORY)
    logits, past = run(session, ids, empty_past(weights.config), 0)
    cache = R.ReferenceCache.empty(weights)
    ref = R.forward(weights, ids, 0, cache)
    diff = np.abs(logits[0] - ref).max()
    print(f"ORT vs numpy reference: max abs logit diff {diff:.2e} over {len(ids)} tokens")
    assert diff < 1e-4
    # present K is after RoPE in llama2.c's layout, exactly what the reference caches
    for i in range(weights.config.n_layers):
        np.testing.assert_allclose(past[f"past_key_values.{i}.key"][0], cache.keys[i], atol=1e-4)
        np.testing.assert_allclose(past[f"past_key_values.{i}.value"][0], cache.values[i], atol=1e-4)


def test_cached_decode_equals_single_pass_and_ppl(weights, tok, session):
    ids = tok.encode(STORY)
    full, _ = run(session, ids, empty_past(weights.config), 0)
    split = 40
    logits, past = run(session, ids[:split], empty_past(weights.config), 0)
    rows = [logits[0]]
    for p, t in enumerate(ids[split:], start=split):
        logits, past = run(session, [t], past, p)
        rows.append(logits[0])
    stepped = np.concatenate(rows)
    diff = np.abs(stepped - full[0]).max()
    ppl_full = R.perplexity(full[0], ids)
    ppl_step = R.perplexity(stepped, ids)
    print(f"cached vs single-pass: max abs diff {diff:.2e}; PPL single={ppl_full:.4f} cached={ppl_step:.4f}")
    assert diff < 1e-4
    assert abs(ppl_full - ppl_step) < 1e-4
    assert ppl_full < 3.0
    words = STORY.split()
    np.random.default_rng(1234).shuffle(words)
    sids = tok.encode(" ".join(words))
    sppl = R.perplexity(run(session, sids, empty_past(weights.config), 0)[0][0], sids)
    print(f"ORT PPL story={ppl_full:.3f} shuffled={sppl:.1f}")
    assert sppl > 20.0


def test_left_padded_batch_matches_unpadded(weights, tok, session):
    a = tok.encode("Once upon a time, there was a cat.")
    b = tok.encode("The dog ran.")
    pad = len(a) - len(b)
    ids = np.array([a, [0] * pad + b], np.int64)
    mask = np.array([[1] * len(a), [0] * pad + [1] * len(b)], np.int64)
    pos = np.array([np.arange(len(a)), np.r_[np.zeros(pad, np.int64), np.arange(len(b))]])
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
             **empty_past(weights.config, batch=2)}
    logits = session.run(["logits"], feeds)[0]
    la, _ = run(session, a, empty_past(weights.config), 0)
    lb, _ = run(session, b, empty_past(weights.config), 0)
    np.testing.assert_allclose(logits[0], la[0], atol=1e-4)
    np.testing.assert_allclose(logits[1, pad:], lb[0], atol=1e-4)


@dataclass
class ProbsAdapter(StandardKVAdapter):
    """Test adapter: standard I/O plus each layer's attention probabilities as outputs."""

    def emit_outputs(self, b, layer, k_new, v_new, k_all, v_all, attn_probs):
        super().emit_outputs(b, layer, k_new, v_new, k_all, v_all, attn_probs)
        b.add_output(b.rename(attn_probs, f"attn_probs.{layer}"), FLOAT,
                     ["batch_size", b.config.n_heads, "sequence_length", "total_sequence_length"])
        b.add_output(b.rename(k_new, f"k_new.{layer}"), FLOAT,
                     ["batch_size", b.config.n_kv_heads, "sequence_length", b.config.head_size])


def test_adapter_protocol_exposes_probs_and_new_kv(weights, tok):
    adapter = ProbsAdapter()
    assert isinstance(adapter, KVGraphAdapter)
    m = build_decoder(weights, adapter)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    c = weights.config
    ids = tok.encode("Once upon a time, there was")
    names = [o.name for o in sess.get_outputs()]
    feeds = {"input_ids": np.array([ids[:5]]), "attention_mask": np.ones((1, 5), np.int64),
             "position_ids": np.arange(5)[None], **empty_past(c)}
    out = dict(zip(names, sess.run(None, feeds)))
    feeds = {"input_ids": np.array([ids[5:]]), "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(5, len(ids))[None]}
    for i in range(c.n_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = out[f"present.{i}.{kv}"]
    out2 = dict(zip(names, sess.run(None, feeds)))
    s = len(ids) - 5
    for i in range(c.n_layers):
        p = out2[f"attn_probs.{i}"]
        assert p.shape == (1, c.n_heads, s, len(ids))
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(p[0, 0], k=5 + 1) == 0)  # causal: no attention to the future
        np.testing.assert_array_equal(out2[f"k_new.{i}"], out2[f"present.{i}.key"][:, :, 5:])
    # the standard graph prunes the probabilities away
    assert len(build_decoder(weights).graph.node) < len(m.graph.node)


def test_decode_speed(weights, tok, session):
    c = weights.config
    ids = tok.encode("Once upon a time")
    logits, past = run(session, ids, empty_past(c), 0)
    n, t0 = 100, time.perf_counter()
    for step in range(n):
        t = int(logits[0, -1].argmax())
        logits, past = run(session, [t], past, len(ids) + step)
    tps = n / (time.perf_counter() - t0)
    print(f"ORT greedy decode (numpy feeds, batch 1): {tps:.0f} tokens/s")
    assert tps > 100


def test_convert_folder_and_og_greedy(weights, tok, session, embedded_model):
    og = pytest.importorskip("onnxruntime_genai")
    spec = DecoderSpec.from_folder(embedded_model)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (5, 8, 4, 8)
    assert (spec.vocab_size, spec.context_length, spec.bos_token_id, spec.eos_token_ids) == (512, 512, 1, (2,))
    for f in ("model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "LICENSE", MANIFEST):
        assert (embedded_model / f).is_file(), f
    assert "karpathy/llama2.c" in (embedded_model / "LICENSE").read_text()

    prompt = tok.encode("Once upon a time")
    # greedy on our ORT graph
    logits, past = run(session, prompt, empty_past(weights.config), 0)
    ours = []
    for step in range(20):
        t = int(logits[0, -1].argmax())
        ours.append(t)
        logits, past = run(session, [t], past, len(prompt) + step)
    # greedy with onnxruntime-genai on the converted folder
    model = og.Model(str(embedded_model))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 20, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    theirs = [int(x) for x in gen.get_sequence(0)][len(prompt):]
    print("og greedy:", tok.decode(prompt + theirs))
    assert theirs == ours


def test_reconversion_skipped_when_up_to_date(stories_paths, tmp_path):
    out = tmp_path / "m"
    msgs: list[str] = []
    convert_llama2c(*stories_paths, out, progress=msgs.append)
    mtime = (out / "model.onnx").stat().st_mtime_ns
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["checkpoint"]["sha256"].startswith("b0a507e7")
    msgs.clear()
    convert_llama2c(*stories_paths, out, progress=msgs.append)
    assert any("up to date" in m for m in msgs)
    assert (out / "model.onnx").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    (out / "tokenizer.json").unlink()  # incomplete folder -> rebuilt
    convert_llama2c(*stories_paths, out)
    assert (out / "tokenizer.json").is_file()


def test_convert_rejects_corrupt_checkpoint(stories_paths, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(stories_paths[0].read_bytes()[:5000])
    with pytest.raises(ValueError, match="bad.bin"):
        convert_llama2c(bad, stories_paths[1], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_graph_builder_helpers(weights):
    b = GraphBuilder(weights.config)
    assert b.unique("x") == "x" and b.unique("x") == "x_1"
    assert b.const_i64([1, 2]) == b.const_i64([1, 2])
    x = b.add_input("inp", FLOAT, [2])
    y = b.node("Relu", [x], "r")
    b.add_output(b.rename(y, "out"), FLOAT, [2])
    b.node("Neg", [x], "dead")  # pruned
    m = b.make_model()
    assert [n.op_type for n in m.graph.node] == ["Relu"]
    with pytest.raises(ValueError):
        b.add_input("inp", FLOAT, [2])


def test_embedded_concurrent_first_use(tmp_path):
    """Two processes converting the embedded model at once both get a complete folder."""
    import os
    import subprocess
    import sys

    code = ("from lemonade_inferos.model.embedded import embedded_model_dir;"
            "print(embedded_model_dir())")
    env = {**os.environ, "INFEROS_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folders = {o[0].strip() for o in outs}
    assert len(folders) == 1
    spec = DecoderSpec.from_folder(folders.pop())
    assert spec.model_path.is_file()
