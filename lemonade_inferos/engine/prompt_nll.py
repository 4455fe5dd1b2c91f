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


def _chunk_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Sum of ``-log softmax(logits)[i, targets[i]]`` over rows with a target."""
    n = targets.shape[0]
    if n == 0:
        return 0.0, 0
    x = logits[:n].astype(np.float64, copy=False)
    m = x.max(axis=-1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))
    picked = x[np.arange(n), targets]
    return float((lse - picked).sum()), n


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
