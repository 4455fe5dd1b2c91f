"""The KV-cache interface the generation loop drives, and the full-precision store.

The engine never looks inside a cache. Each step it asks the cache which ONNX graph to run
(:attr:`KVCache.graph_file`), which past inputs to bind (:meth:`KVCache.past_inputs` on a
request's first run, then only :meth:`KVCache.step_inputs`, the ones that changed) and
which outputs it wants back (:meth:`KVCache.output_names`); after the run it hands those
outputs to :meth:`KVCache.update`. Attention masks and position ids stay the engine's job:
the cache only reports how many key positions it presents (:attr:`KVCache.past_length`),
which may be fewer than the logical sequence length once tokens are evicted, and may mask
some of them (:meth:`KVCache.attention_mask`).

This mirrors the role of ``transformers.Cache`` / ``QuantizedCache`` (``update()`` returns
what attention reads), but across an ONNX Runtime graph boundary instead of a Python
attention call.

Reuse across requests (the prefix cache, :mod:`lemonade_inferos.engine.prefix_cache`):
:meth:`KVCache.snapshot` captures a cache's state as an immutable :class:`KVSnapshot`,
:meth:`KVCache.restore` loads one into a fresh cache of the same configuration
(:meth:`KVCache.reuse_key`), and :meth:`KVCache.truncate` cuts the state back to a prefix
of its tokens, so a request whose prompt extends a cached sequence prefills only the rest.
A snapshot never changes after it is taken and a restored cache never writes into the
snapshot's arrays, so one snapshot can seed any number of concurrent requests.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..model.spec import DecoderSpec
from ..types import KVStats


class KVCacheReuseError(ValueError):
    """A snapshot cannot be restored into this cache, or the state cannot be truncated to
    the asked length (the message says why)."""


@dataclass(frozen=True, eq=False)
class KVSnapshot:
    """An immutable KV state of ``tokens`` tokens, taken by :meth:`KVCache.snapshot`.

    Attributes:
        reuse_key: the :meth:`KVCache.reuse_key` of the cache it came from; it restores
            only into a cache with the same key.
        tokens: logical sequence length (tokens, evicted ones included).
        arrays: every numpy array the state holds, by name (read-only by contract: neither
            the snapshot's owner nor a restored cache writes into them). The byte
            accounting of the prefix cache counts each distinct array (by identity) once,
            so arrays shared between snapshots are held once.
        lossy_tokens: tokens held below the precision a fresh prefill would give them
            (quantized to INT8/INT4 or evicted); 0 = reuse is exact.
        token_axis: when every array holds one slice per token along this axis (the
            full-precision store: axis 2), the prefix cache may split the state into
            token blocks and share equal blocks between sequences; None = keep it whole.
        state: store-specific scalars and small bookkeeping (not counted in bytes).
    """

    reuse_key: str
    tokens: int
    arrays: Mapping[str, np.ndarray]
    lossy_tokens: int = 0
    token_axis: int | None = None
    state: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct arrays of this snapshot."""
        seen: dict[int, int] = {}
        for a in self.arrays.values():
            seen[id(a)] = a.nbytes
        return int(sum(seen.values()))


class KVCache(abc.ABC):
    """A per-request KV cache for one decoder, batch 1.

    Life cycle: create (empty) → for each model run: ``past_inputs()`` → run → ``update()``.
    """

    #: file name of the decoder graph this cache feeds, relative to the model folder.
    graph_file: str = "model.onnx"
    #: :attr:`KVSnapshot.token_axis` of this cache's snapshots: when set, the state can be
    #: cut at any token (the prefix cache splits it into shared blocks); None = cut only
    #: where :meth:`truncate_floor` allows.
    token_axis: int | None = None

    def __init__(self, spec: DecoderSpec):
        self.spec = spec

    @property
    @abc.abstractmethod
    def past_length(self) -> int:
        """Number of key positions the cache presents to the next run (int; the past
        part of ``attention_mask``)."""

    def attention_mask(self, new_tokens: int) -> np.ndarray | None:
        """int64 ``[1, past_length + new_tokens]`` (1 = attend) when some presented past
        positions must be masked out (e.g. spare buffer capacity bound to avoid a copy),
        or None: all ones (the engine's own mask). The array may be reused by the cache
        on its next call."""
        return None

    @property
    @abc.abstractmethod
    def seq_length(self) -> int:
        """Logical sequence length so far (tokens), evicted tokens included."""

    @abc.abstractmethod
    def past_inputs(self) -> Mapping[str, object]:
        """Graph inputs holding the past, by input name: numpy arrays or ``OrtValue``s."""

    def step_inputs(self) -> Mapping[str, object]:
        """The past inputs that may have changed since the last :meth:`past_inputs` or
        :meth:`step_inputs` call (same value types). The engine keeps one IOBinding per
        request: it binds all of :meth:`past_inputs` on the first run and only these on
        later runs, so a cache whose large arrays rarely change (e.g. quantized tiers
        rebuilt once per block) returns just the small ones. An input left out must stay
        exactly as last returned (same object, memory alive and unmodified). Default:
        every past input."""
        return self.past_inputs()

    @abc.abstractmethod
    def output_names(self) -> list[str]:
        """Names of the graph outputs :meth:`update` needs (besides ``logits``)."""

    def output_buffers(self, new_tokens: int) -> Mapping[str, np.ndarray] | None:
        """Preallocated buffers for some of :meth:`output_names`, by name, for the next run
        of ``new_tokens`` tokens, or None (default: the engine lets onnxruntime allocate
        every output). Each array must be C-contiguous with exactly the output's dtype and
        shape for that run; the engine binds it as the output's memory (no allocation, no
        copy) and hands the same array to :meth:`update`. The arrays may be reused by the
        cache on its next call (only valid until then). Meant for decode steps (small,
        fixed-size outputs): a cache should not keep prefill-sized buffers alive."""
        return None

    @abc.abstractmethod
    def update(self, outputs: Mapping[str, object], new_tokens: int) -> None:
        """Consume one run's outputs (numpy arrays or ``OrtValue``s by name).

        Args:
            outputs: the values of :meth:`output_names`.
            new_tokens: how many tokens the run appended (prompt length for prefill, 1 for
                a decode step).
        """

    @abc.abstractmethod
    def stats(self) -> KVStats:
        """Resident bytes by tier and level distribution now."""

    def fp_bytes(self, bytes_per_element: int) -> int:
        """What the logical sequence would take with every K/V element at this size."""
        return int(self.spec.kv_bytes_per_token(bytes_per_element) * self.seq_length)

    # -- reuse across requests (prefix cache) -------------------------------------------
    def reuse_key(self) -> str | None:
        """A string naming everything that makes two caches' states interchangeable (store
        kind, graph, configuration), or None when this cache cannot be snapshotted
        (default). States are only ever restored into a cache with the same key."""
        return None

    def snapshot(self) -> KVSnapshot:
        """The current state as an immutable :class:`KVSnapshot` (the cache stays usable;
        later updates never change the snapshot).

        Raises:
            KVCacheReuseError: this cache does not support snapshots (:meth:`reuse_key`
                is None).
        """
        raise KVCacheReuseError(f"{type(self).__name__} does not support snapshots")

    def restore(self, snap: KVSnapshot) -> None:
        """Load ``snap`` into this cache, which must be empty (``seq_length == 0``).

        The cache then holds exactly the snapshot's state, as if it had run the same
        tokens; it never writes into the snapshot's arrays (copy on write).

        Raises:
            KVCacheReuseError: the cache is not empty or ``snap.reuse_key`` differs from
                :meth:`reuse_key`.
        """
        raise KVCacheReuseError(f"{type(self).__name__} does not support restoring snapshots")

    def truncate(self, tokens: int) -> None:
        """Drop every token at position ``>= tokens`` (keep the first ``tokens``).

        Raises:
            KVCacheReuseError: ``tokens`` is outside ``[truncate_floor(), seq_length]``
                (the state cannot be cut there, e.g. the tokens after it are quantized).
        """
        raise KVCacheReuseError(f"{type(self).__name__} does not support truncation")

    def truncate_floor(self) -> int:
        """The smallest length :meth:`truncate` accepts (tokens); ``seq_length`` when the
        cache cannot be truncated at all."""
        return self.seq_length

    def _check_restore(self, snap: KVSnapshot) -> None:
        if self.seq_length:
            raise KVCacheReuseError(f"restore needs an empty cache; this one holds {self.seq_length} tokens")
        if snap.reuse_key != self.reuse_key():
            raise KVCacheReuseError(f"snapshot of {snap.reuse_key!r} cannot be restored into {self.reuse_key()!r}")

    def _check_truncate(self, tokens: int) -> int:
        tokens = int(tokens)
        lo, hi = self.truncate_floor(), self.seq_length
        if not lo <= tokens <= hi:
            raise KVCacheReuseError(f"cannot truncate to {tokens} tokens; allowed: {lo}..{hi}")
        return tokens


def _as_array(v: object) -> np.ndarray:
    return v if isinstance(v, np.ndarray) else v.numpy()  # OrtValue


class FullPrecisionKVCache(KVCache):
    """Baseline store: the standard graph's ``present.*`` outputs become the next ``past``.

    Each tensor is float32 ``[1, kv_heads, seq, head_dim]``. With IOBinding the present
    ``OrtValue``s are fed back without a copy; the graph's Concat is the only copy per step,
    as in every explicit-KV ONNX decoder (onnxruntime-genai with
    ``past_present_share_buffer=false``).
    """

    graph_file = "model.onnx"
    token_axis = 2

    def __init__(self, spec: DecoderSpec):
        super().__init__(spec)
        s = spec
        empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), dtype=np.float32)
        self._past: dict[str, object] = {}
        for i in range(s.num_layers):
            self._past[s.past_key_name % i] = empty
            self._past[s.past_value_name % i] = empty
        self._out_to_in = {}
        for i in range(s.num_layers):
            self._out_to_in[s.present_key_name % i] = s.past_key_name % i
            self._out_to_in[s.present_value_name % i] = s.past_value_name % i
        self._len = 0

    @property
    def past_length(self) -> int:
        return self._len

    @property
    def seq_length(self) -> int:
        return self._len

    def past_inputs(self) -> Mapping[str, object]:
        return self._past

    def output_names(self) -> list[str]:
        return list(self._out_to_in)

    def update(self, outputs: Mapping[str, object], new_tokens: int) -> None:
        for out_name, in_name in self._out_to_in.items():
            self._past[in_name] = outputs[out_name]
        self._len += new_tokens

    def reuse_key(self) -> str:
        return f"fp32:{self.graph_file}"

    def snapshot(self) -> KVSnapshot:
        """Arrays by past input name, float32 ``[1, kv_heads, seq, head_dim]``, read-only
        views of the present outputs (no copy for numpy arrays: every run's present is new
        memory and :meth:`update` replaces the past, never writes into it; ``OrtValue``s
        are copied out). Exact: ``lossy_tokens`` = 0."""
        arrays = {}
        for name, v in self._past.items():
            a = _as_array(v).view()
            a.flags.writeable = False
            arrays[name] = a
        return KVSnapshot(self.reuse_key(), self._len, arrays, token_axis=2)

    def restore(self, snap: KVSnapshot) -> None:
        """Bind the snapshot's arrays as the past (no copy: the graph's Concat writes every
        run's present into new memory, so the snapshot is never written)."""
        self._check_restore(snap)
        if set(snap.arrays) != set(self._past):
            raise KVCacheReuseError("snapshot arrays do not match this decoder's past inputs")
        for name, a in snap.arrays.items():
            if a.shape[2] != snap.tokens:
                raise KVCacheReuseError(f"snapshot array {name} holds {a.shape[2]} tokens, expected {snap.tokens}")
            self._past[name] = a if a.flags.c_contiguous else np.ascontiguousarray(a)
        self._len = int(snap.tokens)

    def truncate(self, tokens: int) -> None:
        n = self._check_truncate(tokens)
        if n == self._len:
            return
        for name, v in self._past.items():
            self._past[name] = np.ascontiguousarray(_as_array(v)[:, :, :n, :])
        self._len = n

    def truncate_floor(self) -> int:
        return 0

    def stats(self) -> KVStats:
        fp32 = self.fp_bytes(4)
        n = self._len * self.spec.num_layers
        return KVStats(
            tokens=self._len,
            total_bytes=fp32,
            bytes_by_tier={"L0_fp32": fp32},
            level_distribution={"L0": n, "L1": 0, "L2": 0, "L3": 0},
            fp16_bytes=self.fp_bytes(2),
            fp32_bytes=fp32,
            blocks=0,
            tokens_evicted=0,
            store="fp32",
        )
