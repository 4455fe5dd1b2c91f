"""KV-cache stores: the interface the engine drives, the full-precision store and the
tiered quantized store (L0 fp16 / L1 INT8 / L2 INT4 / L3 evicted).

The tiered store (:mod:`.store`) imports onnxruntime lazily; import it from
``lemonade_inferos.kv.store`` (``TieredKVCache``, ``StoreConfig``, ``store_for_scheme``).
"""

from .base import FullPrecisionKVCache, KVCache

__all__ = ["KVCache", "FullPrecisionKVCache"]
