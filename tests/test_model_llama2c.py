"""llama2.c checkpoint loader and the numpy reference forward pass (stories260K)."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest

from lemonade_inferos.model import reference as R
from lemonade_inferos.model.llama2c import load_llama2c, save_llama2c

#: TinyStories-style paragraph written for these tests (simple words, short sentences).
STORY = (
    "Once upon a time, there was a little boy named Tom. He loved to play with his red ball "
    "in the park. One day, Tom saw a big dog under a tree. The dog was sad because he was "
    "lost. Tom said, \"Do not be sad, dog. I will help you find your home.\" Tom and the dog "
    "walked and walked. They saw a kind lady with a big hat. The lady smiled and said, "
    "\"That is my dog! Thank you, Tom!\" The dog was very happy. He wagged his tail and "
    "licked Tom's face. Tom was happy too. He went home and told his mom about the dog. "
    "His mom gave him a big hug and said, \"You are a good boy, Tom.\" From that day on, "
    "Tom and the dog were best friends. They played in the park every day."
)


def test_header_facts(weights):
    c = weights.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert c.head_size == 8 and c.kv_mul == 2 and c.shared_classifier
    assert weights.wcls is weights.token_embedding
    assert weights.wq.shape == (5, 64, 64) and weights.wk.shape == (5, 32, 64)
    assert weights.w1.shape == (5, 172, 64) and weights.w2.shape == (5, 64, 172)
    assert all(a.dtype == np.float32 for a in (weights.wq, weights.rms_final, weights.w3))


def test_truncated_checkpoint_names_file(tmp_path, stories_paths):
    data = stories_paths[0].read_bytes()
    bad = tmp_path / "trunc.bin"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"trunc\.bin.*truncated"):
        load_llama2c(bad)
    bad.write_bytes(data[:10])
    with pytest.raises(ValueError, match=r"trunc\.bin.*header"):
        load_llama2c(bad)
    bad.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match="trailing bytes"):
        load_llama2c(bad)


def test_corrupt_header_names_field(tmp_path, stories_paths):
    data = bytearray(stories_paths[0].read_bytes())
    struct.pack_into("<i", data, 12, 0)  # n_heads = 0
    bad = tmp_path / "corrupt.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt\.bin.*n_heads=0"):
        load_llama2c(bad)
    struct.pack_into("<i", data, 12, 7)  # 64 % 7 != 0
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not divisible"):
        load_llama2c(bad)


def test_nan_weights_rejected(tmp_path, stories_paths):
    data = bytearray(stories_paths[0].read_bytes())
    struct.pack_into("<f", data, 28 + 4 * 10, float("nan"))
    bad = tmp_path / "nan.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="token_embedding.*NaN"):
        load_llama2c(bad)


def test_separate_classifier_roundtrip(tmp_path, weights):
    rng = np.random.default_rng(0)
    wcls = rng.standard_normal(weights.wcls.shape).astype(np.float32) * 0.1
    sep = dataclasses.replace(weights, wcls=wcls)
    path = save_llama2c(sep, tmp_path / "sep.bin")
    assert struct.unpack_from("<7i", path.read_bytes())[5] == -512
    back = load_llama2c(path)
    assert not back.config.shared_classifier
    np.testing.assert_array_equal(back.wcls, wcls)
    np.testing.assert_array_equal(back.token_embedding, weights.token_embedding)
    # the classifier, not the embedding, produces the logits: same hidden state, new head
    shared_logits = R.forward(weights, [1, 403, 407], 0)
    hidden = shared_logits @ np.linalg.pinv(weights.wcls.T.astype(np.float64))
    np.testing.assert_allclose(R.forward(back, [1, 403, 407], 0), hidden @ wcls.T.astype(np.float64),
                               atol=1e-6)


def test_cached_equals_single_pass(weights, tok):
    ids = tok.encode(STORY)[:60]
    full = R.forward(weights, ids, 0)
    cache = R.ReferenceCache.empty(weights)
    parts = [R.forward(weights, ids[:20], 0, cache)]
    for t in ids[20:]:
        parts.append(R.forward(weights, [t], cache.length, cache))
    stepped = np.concatenate(parts)
    print("reference cached vs single-pass max abs diff", np.abs(stepped - full).max())
    assert np.abs(stepped - full).max() < 1e-9
    assert cache.length == len(ids)
    with pytest.raises(ValueError, match="pos=3"):
        R.forward(weights, [5], 3, cache)


def test_greedy_continuation_matches_readme(weights, tok):
    prompt = tok.encode("Once upon a time")
    text = tok.decode(prompt + R.greedy(weights, prompt, 32))
    assert text.startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    ), text


def test_perplexity_story_vs_shuffled(weights, tok):
    ids = tok.encode(STORY)
    assert len(ids) >= 150, len(ids)
    ppl = R.perplexity(R.forward(weights, ids, 0), ids)
    words = STORY.split()
    np.random.default_rng(1234).shuffle(words)
    sids = tok.encode(" ".join(words))
    sppl = R.perplexity(R.forward(weights, sids, 0), sids)
    print(f"reference PPL story={ppl:.3f} ({len(ids)} tokens) shuffled={sppl:.1f}")
    assert ppl < 3.0
    assert sppl > 20.0
