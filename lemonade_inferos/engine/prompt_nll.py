"""The prompt's negative log-likelihood, scored off the path to the first token.

Prefill hands :class:`PromptNLL` each chunk's logits; a single worker thread computes the
chunk's log-softmax rows at the next prompt tokens while the engine runs the next chunk
and decodes (numpy releases the GIL in the reductions, onnxruntime in ``run``), and
:meth:`PromptNLL.result` collects the mean after the first token was handed out. Only
``(sum of -log p, count)`` per chunk is kept, never the ``[T, vocab]`` logits.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferos-nll")


#: rows per slice: keeps the temporary at 64 x vocab float32 (12.6 MB at a 49K vocabulary)
_ROWS = 64


def _chunk_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Sum of ``-log softmax(logits)[i, targets[i]]`` over rows with a target (float32
    exponentials, float64 sums, in slices of :data:`_ROWS` rows)."""
    n = targets.shape[0]
    total = 0.0
    buf = np.empty((min(n, _ROWS), logits.shape[1]), dtype=np.float32)
    for i in range(0, n, _ROWS):
        x = logits[i:min(i + _ROWS, n)]
        k = x.shape[0]
        m = x.max(axis=-1, keepdims=True)
        e = np.subtract(x, m, out=buf[:k])
        np.exp(e, out=e)
        lse = m[:, 0].astype(np.float64) + np.log(e.sum(axis=-1, dtype=np.float64))
        total += float((lse - x[np.arange(k), targets[i:i + k]]).sum())
    return total, n


class PromptNLL:
    """Accumulates the mean NLL (nats/token) of ``ids[1:]`` given the preceding tokens.

    Args:
        ids: the prompt token ids.
    """

    def __init__(self, ids: list[int]):
        self._ids = np.asarray(ids, dtype=np.int64)
        self._futures: list[Future] = []

    def add(self, logits: np.ndarray, start: int) -> None:
        """Score one prefill chunk: ``logits`` float32 ``[n, vocab]`` for positions
        ``start..start+n-1`` (row ``i`` predicts token ``start+i+1``). The array must not
        be modified afterwards (it is read on the worker thread)."""
        targets = self._ids[start + 1:start + 1 + logits.shape[0]]
        self._futures.append(_POOL.submit(_chunk_nll, logits, targets))

    def result(self) -> float | None:
        """Mean NLL over every scored token, or None for a one-token prompt."""
        total, count = 0.0, 0
        for f in self._futures:
            s, n = f.result()
            total, count = total + s, count + n
        self._futures.clear()
        return total / count if count else None
