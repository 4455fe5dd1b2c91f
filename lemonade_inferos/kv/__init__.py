"""KV-cache stores: the interface the engine drives, the full-precision store and the
tiered quantized store (L0 fp16 / L1 INT8 / L2 INT4 / L3 evicted)."""

from .base import FullPrecisionKVCache, KVCache

__all__ = ["KVCache", "FullPrecisionKVCache"]
