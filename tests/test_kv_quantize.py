import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lemonade_inferos.kv.quantize import (bits_per_element, dequantize, max_abs_error_bound, pack_int4,
                                          quantize, stored_nbytes, unpack_int4)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([1, 2, 4, 8, 16, 32]), axis=st.sampled_from([0, 1, 2]),
       scale=st.floats(1e-3, 50.0), offset=st.floats(-30.0, 30.0), seed=st.integers(0, 2**31 - 1))
def test_round_trip_error_bound(bits, group, axis, scale, offset, seed):
    rng = np.random.default_rng(seed)
    shape = [2, 3, 4]
    shape[axis] = group * 2
    x = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
    qt = quantize(x, bits, axis=axis, group=group)
    assert qt.q.dtype == np.uint8 and qt.scale.dtype == np.float16 and qt.zero.dtype == np.uint8
    assert int(qt.q.max()) < 2**bits and int(qt.zero.max()) < 2**bits
    err = np.abs(qt.dequantize() - x)
    bound = max_abs_error_bound(qt) + 1e-5 * (1 + np.abs(x))
    assert (err <= bound).all()


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 101), seed=st.integers(0, 2**31 - 1))
def test_int4_pack_round_trip(n, seed):
    q = np.random.default_rng(seed).integers(0, 16, n).astype(np.uint8)
    p = pack_int4(q)
    assert p.dtype == np.uint8 and p.size == (n + 1) // 2
    assert (unpack_int4(p, n) == q).all()
    if n >= 2:
        assert p[0] == (q[0] | (q[1] << 4))  # ONNX order: even index in the low nibble


def test_checks_raise():
    with pytest.raises(ValueError):
        quantize(np.zeros((4, 3), np.float32), 4, axis=1, group=2)  # not a multiple
    with pytest.raises(ValueError):
        quantize(np.zeros((4,), np.int32), 8, axis=0, group=2)
    with pytest.raises(ValueError):
        quantize(np.zeros((4,), np.float32), 3, axis=0, group=2)
    with pytest.raises(ValueError):
        quantize(np.array([np.nan, 1.0], np.float32), 8, axis=0, group=2)
    with pytest.raises(ValueError):
        pack_int4(np.array([16], np.uint8))
    with pytest.raises(ValueError):
        dequantize(np.zeros((4,), np.uint8), np.zeros((3,), np.float16), np.zeros((3,), np.uint8), axis=0, group=2)


def test_byte_accounting():
    assert bits_per_element(4, 32) == 4.625
    assert bits_per_element(8, 32) == 8.75
    assert stored_nbytes(64, 2, 4) == 32 + 4 + 1
    assert stored_nbytes(64, 2, 8) == 64 + 4 + 2
    qt = quantize(np.ones((2, 32), np.float32), 4, axis=1, group=32)
    assert qt.nbytes() == 32 + 4 + 1
