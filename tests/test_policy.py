"""Policy model: sizes, validation at the boundary, merging, presets and their ordering."""

from __future__ import annotations

import json

import pytest

from lemonade_inferos.policy import (
    Policy,
    PolicyError,
    load_policy,
    parse_size,
    policy_json_schema,
    preset_names,
    validate_policy,
)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2048MiB", 2048 * 1024**2),
        ("4GiB", 4 * 1024**3),
        ("2GB", 2 * 1000**3),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("512KB", 512_000),
        ("10B", 10),
        (1073741824, 1073741824),
        ("3 gib", 3 * 1024**3),
    ],
)
def test_parse_size_units(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "2 parsecs", "GB", "-1GB", -5, True, None, [1]])
def test_parse_size_rejects_garbage_naming_the_field(value):
    with pytest.raises(ValueError) as e:
        parse_size(value, field="io.dml_pool_bytes")
    assert "io.dml_pool_bytes" in str(e.value)


def test_defaults_match_the_seed_schema():
    p = Policy()
    assert p.kv.recent_window == 64
    assert p.kv.mode == "dynamic"
    assert p.io.dml_pool_bytes == 2 * 1024**3 and p.io.host_pool_bytes == 4 * 1024**3
    assert p.quality.max_delta_ppl == 0.5 and p.quality.min_accept_rate == 0.5
    assert (p.scheduler.mode, p.scheduler.prefill_device, p.scheduler.decode_device) == ("hybrid", "dml", "npu")


def test_partial_document_merges_over_base_and_keeps_other_fields():
    base = load_policy("default")
    window = base.kv.recent_window
    p = base.merged({"kv": {"recent_window": 128}, "io": {"host_pool_bytes": "8GiB"}})
    assert p.kv.recent_window == 128
    assert p.io.host_pool_bytes == 8 * 1024**3
    assert p.kv.level_thresholds == base.kv.level_thresholds
    assert p.scheduler == base.scheduler
    assert base.kv.recent_window == window != 128  # the base is untouched


def test_yaml_root_key_and_json_files(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("infer_os:\n  kv:\n    recent_window: 32\n  io:\n    dml_pool_bytes: 4096MiB\n")
    p = load_policy(y)
    assert p.kv.recent_window == 32 and p.io.dml_pool_bytes == 4096 * 1024**2
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"quality": {"max_delta_ppl": 0.1}}))
    assert load_policy(j).quality.max_delta_ppl == 0.1


@pytest.mark.parametrize(
    "doc, field",
    [
        ({"kv": {"recent_window": 8}}, "kv.recent_window"),
        ({"kv": {"recent_window": 1024}}, "kv.recent_window"),
        ({"kv": {"mode": "turbo"}}, "kv.mode"),
        ({"kv": {"level_thresholds": {"L3_evict": 1.5}}}, "kv.level_thresholds.L3_evict"),
        ({"kv": {"level_thresholds": {"L1_int8": 0.9, "L2_int4": 0.5, "L3_evict": 0.7}}}, "kv.level_thresholds"),
        ({"io": {"dml_pool_bytes": "512MiB"}}, "io.dml_pool_bytes"),
        ({"io": {"host_pool_bytes": "lots"}}, "io.host_pool_bytes"),
        ({"scheduler": {"decode_device": "tpu"}}, "scheduler.decode_device"),
        ({"quality": {"max_delta_ppl": 3}}, "quality.max_delta_ppl"),
        ({"loops": {"fast_ms": 50, "mid_ms": 10}}, "loops"),
        ({"kv": {"recent_windw": 64}}, "kv.recent_windw"),
    ],
)
def test_bad_fields_are_named_and_old_policy_stays(doc, field):
    base = load_policy("default")
    before = base.to_dict()
    with pytest.raises(PolicyError) as e:
        base.merged(doc)
    fields = [err["field"] for err in e.value.errors]
    assert field in fields, fields
    assert field in str(e.value)
    assert base.to_dict() == before


def test_error_message_shows_value_and_allowed_range():
    with pytest.raises(PolicyError) as e:
        validate_policy({"kv": {"recent_window": 8}})
    msg = str(e.value)
    assert "8" in msg and "16" in msg


def test_unknown_preset_lists_known_ones():
    with pytest.raises(PolicyError) as e:
        load_policy("70b")
    assert "70b" in str(e.value) and "default" in str(e.value)


def test_all_presets_exist_and_validate():
    names = set(preset_names())
    assert {"default", "3b", "7b", "13b", "latency", "throughput", "quality"} <= names
    for n in names:
        assert load_policy(n).name == n


def _compression_order(p: Policy) -> tuple:
    """A key that grows with how much a policy may compress (for preset ordering)."""
    t = p.kv.level_thresholds
    if p.kv.mode == "quality_optimized":
        t2, t3 = 1.0, 1.0
    else:
        t2, t3 = t.L2_int4, t.L3_evict
    return (-t3, -t2, -t.L1_int8, -p.kv.recent_window)


def test_quality_preset_never_compresses_more_than_default():
    q, d = load_policy("quality"), load_policy("default")
    assert q.kv.recent_window >= d.kv.recent_window
    assert q.kv.mode == "quality_optimized"
    for f in ("L1_int8", "L2_int4", "L3_evict"):
        assert getattr(q.kv.level_thresholds, f) >= getattr(d.kv.level_thresholds, f)


def test_13b_preset_compresses_most():
    p13 = load_policy("13b")
    for n in preset_names():
        other = load_policy(n)
        assert p13.kv.recent_window <= other.kv.recent_window, n
        for f in ("L1_int8", "L2_int4", "L3_evict"):
            assert getattr(p13.kv.level_thresholds, f) <= getattr(other.kv.level_thresholds, f), (n, f)


def test_json_schema_describes_sections():
    s = policy_json_schema()
    text = json.dumps(s)
    for key in ("kv", "io", "scheduler", "quality", "loops", "recent_window", "L3_evict"):
        assert key in text
