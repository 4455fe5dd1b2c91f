import numpy as np
from hypothesis import given, settings, strategies as st

from lemonade_inferos.kv.tiers import assign_levels, demotion_ranks, threshold_levels

THR = st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)).map(lambda t: tuple(sorted(t)))


def test_threshold_semantics():
    imp = np.arange(10, dtype=float)[::-1]  # block 0 most important
    lv = threshold_levels(imp, (0.0, 0.5, 0.8))
    assert list(lv) == [1] * 5 + [2] * 3 + [3] * 2
    assert (threshold_levels(imp, (1.0, 1.0, 1.0)) == 0).all()
    assert (threshold_levels(imp, (0.0, 0.0, 0.0), "disabled") == 0).all()
    assert threshold_levels(imp, (0.0, 0.0, 0.5), "quality_optimized").max() == 1
    assert sorted(demotion_ranks(imp)) == [i / 10 for i in range(10)]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 30), thr=THR, fixed=st.integers(0, 5000), budget=st.integers(0, 20000),
       mode=st.sampled_from(["dynamic", "latency_optimized", "throughput_optimized", "quality_optimized"]),
       seed=st.integers(0, 2**31 - 1))
def test_budget_never_exceeded_once_reachable(n, thr, fixed, budget, mode, seed):
    rng = np.random.default_rng(seed)
    imp = rng.random(n)
    cost = [1000, 530, 290, 0]
    cur = rng.integers(0, 4, n)
    lv = assign_levels(imp, thr, mode, level_bytes=cost, fixed_bytes=fixed, budget_bytes=budget, current=cur)
    assert (lv >= np.minimum(cur, 3)).all() if mode != "quality_optimized" else True
    total = fixed + sum(cost[x] for x in lv)
    if mode == "quality_optimized":
        assert lv.max(initial=0) <= max(1, cur.max(initial=0))
        if budget >= fixed + cost[1] * n:
            assert total <= budget or (cur > 1).any()
    elif budget >= fixed:
        assert total <= budget
