"""llama.cpp as a peer engine, through ``llama-cpp-python`` (built from source by pip; the
``bench`` extra). Same GGUF file, same token ids, same thread count as our engine.

KV cache types: ``f16``, ``q8_0``, ``q4_0`` (``type_k``/``type_v``); a quantized V cache
needs flash attention, so every run uses ``flash_attn=True`` (f16 too, for one code path).
Per-element storage: f16 16 bits; q8_0 blocks of 32 with an fp16 scale = 8.5 bits; q4_0
blocks of 32 with an fp16 scale = 4.5 bits (ggml ``block_q8_0``/``block_q4_0``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

KV_BITS = {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5}


def unavailable_reason() -> str | None:
    """None when llama-cpp-python imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or a broken native build
        return f"llama-cpp-python not importable ({e}); pip install llama-cpp-python (builds llama.cpp, ~4 min)"
    return None


def version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "?")


def _ggml_type(name: str) -> int:
    import llama_cpp

    return {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}[name]


def load(gguf: str, n_ctx: int, kv_type: str, threads: int, logits_all: bool = False) -> Any:
    """A ``llama_cpp.Llama`` on ``gguf`` with a ``kv_type`` K and V cache (flash attention on)."""
    import llama_cpp

    kw: dict[str, Any] = dict(n_ctx=n_ctx, n_batch=min(512, n_ctx), n_ubatch=min(512, n_ctx), n_threads=threads,
                              n_threads_batch=threads, logits_all=logits_all, verbose=False,
                              type_k=_ggml_type(kv_type), type_v=_ggml_type(kv_type), seed=0)
    try:
        return llama_cpp.Llama(gguf, flash_attn=True, **kw)
    except TypeError:  # newer bindings take flash_attn_type
        return llama_cpp.Llama(gguf, flash_attn_type=1, **kw)


def logits(llm: Any, ids: list[int]) -> np.ndarray:
    """float32 ``[len(ids), vocab]``: llama.cpp's logits for every position after evaluating
    ``ids`` from an empty cache (llama-perplexity's protocol: batches of ``n_batch``, every
    token reading the cache at ``type_k``/``type_v``)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)
