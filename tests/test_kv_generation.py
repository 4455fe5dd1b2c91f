"""End to end: generation with every preset's KV store on the embedded model stays fluent."""

from __future__ import annotations

import numpy as np
import pytest

from lemonade_inferos.engine import Engine, GenerationConfig
from lemonade_inferos.kv.base import FullPrecisionKVCache
from lemonade_inferos.plugins import get_plugin_manager
from lemonade_inferos.policy import load_policy, preset_names
from lemonade_inferos.quality import perplexity, token_nll

PROMPTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom and his dog went to the park. The sun was shining and",
    "One day, a big red bird flew to the tree. The bird was sad because",
]


@pytest.fixture(scope="module")
def engine(embedded_model):
    return Engine(embedded_model, pm=get_plugin_manager(entry_points=False))


def _fp_ppl(engine, ids: list[int], start: int) -> float:
    """Perplexity of ids[start:] under the full-precision model (teacher forced)."""
    logits = engine.teacher_forced_logits(ids, FullPrecisionKVCache(engine.spec))
    return perplexity(token_nll(logits[start - 1 : -1], np.asarray(ids[start:])))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_preset_greedy_matches_baseline_first_20_tokens(engine, prompt):
    base = engine.generate(prompt, GenerationConfig(max_new_tokens=300), baseline=True)
    comp = engine.generate(prompt, GenerationConfig(max_new_tokens=300), policy=load_policy("default"))
    assert comp.stats.kv.store != "fp32", "the tiered store must be active for this test to mean anything"
    assert comp.token_ids[:20] == base.token_ids[:20]
    # the run was long enough for old blocks to be quantized or evicted
    lv = comp.stats.kv.level_distribution
    assert lv["L1"] + lv["L2"] + lv["L3"] > 0, lv
    assert comp.stats.kv.total_bytes < 0.5 * comp.stats.kv.fp16_bytes


@pytest.mark.parametrize("preset", sorted(preset_names()))
def test_every_preset_stays_fluent(engine, preset):
    """Fluency = the full-precision model finds the compressed run's own output likely:
    perplexity of the generated continuation stays within 1.5x of the baseline's."""
    pol = load_policy(preset)
    for prompt in PROMPTS[:2]:
        prompt_ids = engine.encode(prompt)
        base = engine.generate(prompt_ids, GenerationConfig(max_new_tokens=250), baseline=True)
        comp = engine.generate(prompt_ids, GenerationConfig(max_new_tokens=250), policy=pol)
        assert len(comp.token_ids) > 50
        ppl_base = _fp_ppl(engine, prompt_ids + base.token_ids, len(prompt_ids))
        ppl_comp = _fp_ppl(engine, prompt_ids + comp.token_ids, len(prompt_ids))
        assert ppl_comp < 1.5 * ppl_base + 0.5, (preset, ppl_base, ppl_comp, comp.text[:200])
        words = comp.text.split()
        assert len(set(words)) > 15, comp.text  # not a degenerate loop of a few words
