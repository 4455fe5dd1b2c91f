"""Quality protocol helpers and their invariants (real engine, real cached path)."""

from __future__ import annotations

import numpy as np
import pytest

from lemonade_inferos.engine import Engine
from lemonade_inferos.kv.base import FullPrecisionKVCache
from lemonade_inferos.plugins import get_plugin_manager
from lemonade_inferos.policy import load_policy
from lemonade_inferos.quality import (
    EvalInputError, chunk_ids, evaluate_ids, evaluate_text, kl_divergence, perplexity, token_nll,
)


def test_kl_divergence_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 32))
    assert np.allclose(kl_divergence(a, a), 0, atol=1e-12)
    b = a + rng.normal(scale=0.5, size=a.shape)
    kl = kl_divergence(a, b)
    assert (kl > 0).all()
    assert np.allclose(kl_divergence(a, a + 3.0), 0, atol=1e-12)  # softmax is shift-invariant
    # matches the definition on one row
    p = np.exp(a[0]) / np.exp(a[0]).sum()
    q = np.exp(b[0]) / np.exp(b[0]).sum()
    assert kl[0] == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-9)


def test_token_nll_and_perplexity_of_uniform_logits():
    logits = np.zeros((4, 100))
    nll = token_nll(logits, np.array([1, 2, 3, 4]))
    assert np.allclose(nll, np.log(100))
    assert perplexity(nll) == pytest.approx(100.0)


def test_chunking():
    ids = list(range(1100))
    ch = chunk_ids(ids, 512)
    assert [len(c) for c in ch] == [512, 512, 76]
    assert sum(ch, []) == ids
    assert chunk_ids(list(range(513)), 512) == [list(range(512))]  # a 1-token tail scores nothing


@pytest.fixture(scope="module")
def engine(embedded_model):
    return Engine(embedded_model, pm=get_plugin_manager(entry_points=False))


def test_full_precision_against_itself_is_exactly_zero(engine):
    ids = engine.encode("Lily and Tom went to the park. They played on the swings and ate ice cream.")
    res = evaluate_ids(engine, ids, load_policy("default"), cache_factory=lambda: FullPrecisionKVCache(engine.spec))
    assert res["delta_ppl"] == 0.0 and res["kld_mean"] == pytest.approx(0.0, abs=1e-12)
    assert res["top1_agreement"] == 1.0
    assert res["scored_tokens"] == len(ids) - 1


def test_too_short_inputs_are_rejected(engine):
    with pytest.raises(EvalInputError, match="at least 2"):
        evaluate_ids(engine, [1], load_policy())
    with pytest.raises(EvalInputError, match="empty"):
        evaluate_text(engine, "  ", load_policy())
