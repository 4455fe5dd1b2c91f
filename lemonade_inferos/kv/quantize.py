"""Group-wise asymmetric integer quantization of KV tensors (pure numpy, no ORT).

Scheme (the ONNX ``DequantizeLinear``-21 blocked layout, so the graph can dequantize what
this module writes): ``x`` is cut into groups of ``group`` consecutive elements along one
``axis``; every group gets a float16 ``scale`` and an unsigned integer ``zero`` point *in
the quantized type* (uint8 for 8 bits, uint4 for 4 bits)::

    q = clip(round(x / scale) + zero, 0, 2**bits - 1)      (uint8 / uint4)
    x' = (q - zero) * scale                                 (DequantizeLinear)

``scale = (max(g, 0) - min(g, 0)) / (2**bits - 1)`` rounded *up* to float16 and
``zero = round(-min(g, 0) / scale)``: the range is widened to contain 0 so that the zero
point is an integer of the quantized type (ONNX/TFLite asymmetric quantization). Then
``|x - x'| <= scale / 2`` for every element (plus float rounding), see
:func:`max_abs_error_bound`. On stories260K keys this costs ~15 % more RMS error than a
float zero point (KIVI's ``min``) and saves 12 bits of metadata per group at INT4.

Where groups lie (the literature this follows):

* keys per-channel, groups along tokens (KIVI, Liu et al. 2024, "KIVI: A Tuning-Free
  Asymmetric 2bit Quantization for KV Cache"): key channels have outliers/offsets, so one
  scale per channel per block of tokens;
* values per-token, groups along channels (KIVI); with head_dim 8 a group spans all KV
  heads of one layer (32 elements for stories260K) so metadata stays at 20 bits per 32
  elements at INT4;
* uniform per-token groups of 32 = llama.cpp ``q8_0`` / ``q4_0`` (ggml blocks of 32 with
  one fp16 scale; llama.cpp's q4_0 is symmetric, ours asymmetric);
* HF transformers ``QuantizedCache`` (quanto backend): int4, group 64, plus an fp16
  residual window.

Bytes per element, metadata included (``bits_per_element``): INT8 group 32 with fp16
scale + uint8 zero = 8 + 24/32 = 8.75 bits; INT4 group 32 with fp16 scale + uint4 zero =
4 + 20/32 = 4.625 bits; INT4 group 64 = 4.3125 bits; float16 = 16 bits.

INT4 packing (:func:`pack_int4`): two values per byte, the element with the even flat
index in the low nibble (the ONNX ``uint4`` storage order), odd element count padded
with a zero nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: bit widths this module quantizes to.
SUPPORTED_BITS = (4, 8)
#: smallest scale used (a constant group would otherwise get scale 0).
MIN_SCALE = float(np.float16(2.0**-14))


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def _check_axis_group(shape: tuple[int, ...], axis: int, group: int, what: str = "x") -> int:
    if not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"group must be a positive integer, got {group!r}")
    nd = len(shape)
    if nd == 0:
        raise ValueError(f"{what} must have at least 1 dimension")
    if not -nd <= axis < nd:
        raise ValueError(f"axis {axis} out of range for {what} with shape {shape}")
    axis = axis % nd
    if shape[axis] % group:
        raise ValueError(
            f"{what} axis {axis} has length {shape[axis]}, not a multiple of group {group}"
        )
    return axis


def _grouped(x: np.ndarray, axis: int, group: int) -> np.ndarray:
    """View ``x`` as ``[..., n/group, group, ...]`` (the group axis right after ``axis``)."""
    s = x.shape
    return x.reshape(s[:axis] + (s[axis] // group, group) + s[axis + 1:])


@dataclass
class QuantizedTensor:
    """One quantized tensor in the DequantizeLinear blocked layout.

    Attributes:
        q: uint8, same shape as the source; values in ``[0, 2**bits)`` (unpacked; use
            :func:`pack_int4` for INT4 storage).
        scale: float16, the source shape with ``shape[axis] // group`` along ``axis``.
        zero: uint8, shape of ``scale``, values in ``[0, 2**bits)``.
        bits: 4 or 8.  axis: blocked axis (non-negative).  group: block length.
    """

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    axis: int
    group: int

    def dequantize(self) -> np.ndarray:
        """float32 reconstruction, shape of ``q``."""
        return dequantize(self.q, self.scale, self.zero, axis=self.axis, group=self.group)

    def nbytes(self) -> int:
        """Stored bytes: packed data (bits/8 per element) + fp16 scales + zero points
        (bits/8 per group, INT4 zero points packed too)."""
        return stored_nbytes(self.q.size, self.scale.size, self.bits)


def stored_nbytes(n_elements: int, n_groups: int, bits: int) -> int:
    """Bytes of ``n_elements`` values at ``bits`` (INT4 two per byte, rounded up) plus
    ``n_groups`` float16 scales and ``n_groups`` zero points in the quantized type."""
    _check_bits(bits)
    if bits == 8:
        return int(n_elements + 2 * n_groups + n_groups)
    return int((n_elements + 1) // 2 + 2 * n_groups + (n_groups + 1) // 2)


def bits_per_element(bits: int, group: int, scale_bits: int = 16, zero_bits: int | None = None) -> float:
    """Mean stored bits per element, metadata included: ``bits + (scale_bits + zero_bits) / group``
    (zero point in the quantized type unless ``zero_bits`` is given)."""
    _check_bits(bits)
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    zb = bits if zero_bits is None else zero_bits
    return bits + (scale_bits + zb) / group


def quantize_groups(g: np.ndarray, bits: int, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arithmetic of :func:`quantize` on values already arranged in groups: every
    slice along ``axis`` of the float32 array ``g`` (non-empty) is one group.

    Returns ``(q, scale, zero)``: codes uint8 (shape of ``g``), scale float16 and zero
    point uint8 with ``axis`` kept at length 1. No input checks (callers validate);
    NaN/inf in ``g`` give a non-finite scale.
    """
    qmax = (1 << bits) - 1
    lo = np.minimum(g.min(axis=axis, keepdims=True), 0.0)
    hi = np.maximum(g.max(axis=axis, keepdims=True), 0.0)
    s = np.maximum((hi - lo) / qmax, MIN_SCALE).astype(np.float32)
    s16 = s.astype(np.float16)
    # round the scale up so the range stays covered
    s16 = np.where(s16.astype(np.float32) < s, np.nextafter(s16, np.float16(np.inf)), s16)
    sf = s16.astype(np.float32)
    zero = np.clip(np.rint(-lo / sf), 0, qmax)
    q = np.rint(g / sf)
    q += zero
    np.clip(q, 0, qmax, out=q)
    return q.astype(np.uint8), s16, zero.astype(np.uint8)


def quantize(x: np.ndarray, bits: int, *, axis: int, group: int) -> QuantizedTensor:
    """Asymmetric group quantization of ``x`` along ``axis`` in groups of ``group``.

    Args:
        x: float16/float32/float64 array of any shape (e.g. keys ``[layers, tokens,
            kv_heads*head_dim]``), finite values.
        bits: 4 or 8.
        axis: the axis groups run along (tokens for per-channel keys, channels for
            per-token values).
        group: elements per group; ``x.shape[axis]`` must be a multiple of it.

    Returns:
        :class:`QuantizedTensor` (``q`` uint8 unpacked, ``scale`` float16, ``zero`` uint8).

    Raises:
        ValueError: non-float dtype, non-finite values, bad bits/axis/group.
    """
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"x must be a float array, got dtype {x.dtype}")
    bits = _check_bits(bits)
    axis = _check_axis_group(x.shape, axis, group)
    if x.size and not np.isfinite(x).all():
        raise ValueError("x contains NaN or infinity")
    g = _grouped(x.astype(np.float32, copy=False), axis, group)
    red = axis + 1
    if g.size:
        q, s16, zero = quantize_groups(g, bits, red)
    else:
        q = g.astype(np.uint8)
        s16 = np.zeros(g.shape[:red] + (1,) + g.shape[red + 1:], np.float16)
        zero = s16.astype(np.uint8)
    return QuantizedTensor(
        q=q.reshape(x.shape),
        scale=np.squeeze(s16, axis=red),
        zero=np.squeeze(zero, axis=red),
        bits=bits,
        axis=axis,
        group=int(group),
    )


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, *, axis: int, group: int) -> np.ndarray:
    """Numpy reference of ``DequantizeLinear`` (blocked): ``(q - zero) * scale``, float32.

    Args:
        q: uint8 (unpacked) values, any shape.
        scale: float16/float32, ``q.shape`` with ``q.shape[axis] // group`` along ``axis``.
        zero: uint8, shape of ``scale``.

    Raises:
        ValueError: shapes/dtypes inconsistent.
    """
    q = np.asarray(q)
    if q.dtype != np.uint8:
        raise ValueError(f"q must be uint8 (unpacked), got {q.dtype}")
    axis = _check_axis_group(q.shape, axis, group, "q")
    want = q.shape[:axis] + (q.shape[axis] // group,) + q.shape[axis + 1:]
    if scale.shape != want or zero.shape != want:
        raise ValueError(f"scale/zero must have shape {want}, got {scale.shape} / {zero.shape}")
    if scale.dtype.kind != "f" or zero.dtype != np.uint8:
        raise ValueError(f"scale must be float and zero uint8, got {scale.dtype} / {zero.dtype}")
    g = _grouped(q, axis, group).astype(np.float32)
    s = np.expand_dims(scale.astype(np.float32), axis + 1)
    z = np.expand_dims(zero.astype(np.float32), axis + 1)
    return ((g - z) * s).reshape(q.shape)


def max_abs_error_bound(qt: QuantizedTensor) -> np.ndarray:
    """Per-element bound ``scale / 2`` (float32, shape of ``qt.q``) on ``|x - dequantize|``."""
    s = np.expand_dims(qt.scale.astype(np.float32), qt.axis + 1) / 2
    shape = _grouped(qt.q, qt.axis, qt.group).shape
    return np.broadcast_to(s, shape).reshape(qt.q.shape)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack uint8 values in ``[0, 16)`` two per byte (flat order, even index in the low
    nibble: the ONNX uint4 layout). Returns a 1-D uint8 array of ``ceil(q.size / 2)``.

    Raises:
        ValueError: dtype not uint8 or a value >= 16.
    """
    q = np.asarray(q)
    if q.dtype != np.uint8:
        raise ValueError(f"pack_int4 needs uint8 input, got {q.dtype}")
    f = q.reshape(-1)
    if f.size and int(f.max()) > 15:
        raise ValueError("pack_int4: values must be < 16")
    if f.size % 2:
        f = np.concatenate([f, np.zeros(1, np.uint8)])
    return (f[0::2] | (f[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: the first ``n`` uint8 values (1-D).

    Raises:
        ValueError: ``packed`` is not uint8 or holds fewer than ``n`` nibbles.
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise ValueError(f"unpack_int4 needs uint8 input, got {packed.dtype}")
    p = packed.reshape(-1)
    if n < 0 or 2 * p.size < n:
        raise ValueError(f"unpack_int4: {p.size} bytes hold fewer than {n} values")
    out = np.empty(2 * p.size, np.uint8)
    out[0::2] = p & 0x0F
    out[1::2] = p >> 4
    return out[:n]
