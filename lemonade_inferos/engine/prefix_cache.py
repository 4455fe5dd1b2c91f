"""Prefix cache: a request whose prompt extends an earlier request's tokens starts from that
request's KV state and prefills only the rest.

After a request, the engine hands its KV state (:meth:`KVCache.snapshot`, either store) and
the token ids that state holds (prompt + generated tokens that were fed back) to
:meth:`PrefixCache.store`. A later request calls :meth:`PrefixCache.begin`: among the cached
states of the same store configuration (:meth:`KVCache.reuse_key`) it finds the longest
common prefix (LCP) of token ids with the new prompt, restores that state into the
request's fresh cache, cuts it back to the LCP (:meth:`KVCache.truncate`), and the engine
prefills ``prompt[start:]`` at positions ``start...`` only. At least the last prompt token
is always prefilled (its logits give the first generated token). The same mechanism as
llama.cpp server's ``cache_prompt`` (one slot per conversation) and vLLM's automatic prefix
caching (hash-chained blocks, Kwon et al. 2023 "PagedAttention"), which this module
follows for the full-precision store.

Correctness rules
-----------------
* **Never a different sequence.** A state is looked up by comparing token ids, never by a
  hash alone: the reused length is the exact LCP of the cached ids and the prompt, and
  the state is cut back to it, so no token the prompt does not have at that position is
  ever attended. Full-precision blocks are keyed by a SHA-256 chain over all token ids
  up to the block's end (and their position), and the entry's ids are compared as well.
* **Full precision is exact.** A restored full-precision state holds the same float32
  K/V a fresh prefill computes for those tokens (up to float rounding of a different
  run shape), so the suffix's logits equal a fresh prefill's within float tolerance
  (tested).
* **Tiered states are bounded by measurement.** A tiered state whose tokens are all at L0
  (float16) is reused like a full-precision one. A state with quantized (INT8/INT4) or
  evicted tokens differs from a fresh prefill, which attends the whole prompt at full
  precision: its *measured* quality cost is kept with it and it is reused only while
  that cost is within the request's budgets (ΔPPL: ``InferenceContext.quality_budget``,
  else ``quality.max_delta_ppl``; KLD: ``quality.max_kld``, the quality guard's two
  budgets); otherwise the prompt is re-prefilled (counted in ``quality_rejects``). The
  measurement (:func:`probe_cost`): right after the prefill that built the state, the last
  ``probe_tokens`` prompt tokens (still at L0) are cut off a copy of the state and
  prefilled again against its quantized/evicted prefix — exactly what a reusing request
  does with its suffix — and their next-token distributions are compared with the fresh
  prefill's for the same tokens: ``kld`` = mean KL(fresh ‖ reuse) in nats/token
  (llama.cpp's ``--kl-divergence``), and ``ΔPPL = PPL_fresh * (exp(kld) - 1)``, the
  perplexity increase the state adds in expectation (E[NLL_reuse - NLL_fresh] = KL when
  the next tokens follow the fresh distribution), at the probe tokens' perplexity — the
  guard's absolute ΔPPL unit, with far less variance than the NLL difference of ~16
  sampled tokens. A state built on a reused one keeps the larger of its own and its
  parent's cost. Measured limit (benchmarks/RESULTS.md §7): the probe sees the state as
  its prefill left it, not after the reply's decode steps re-tiered it; on
  SmolLM2-135M with the ``default`` preset it measured KLD 0.006 where the next reply's
  NLL rose by 0.034 nats/token. A state that could not be
  probed (nothing was quantized yet when its prefill ended, or the prefilled suffix was
  too short) takes the largest probe measured so far for its store configuration in this
  process; with no measurement at all it is never reused.
  The tiered store can be cut back only where every later token is at L0
  (:meth:`KVCache.truncate_floor`, block granularity); a shorter LCP falls back to an
  earlier entry or a full prefill.
* **Isolation.** Cached states are immutable: full-precision blocks are read-only arrays;
  the tiered store's tier arrays are replaced, never written, by re-tiering, and its L0
  buffer is copied on restore. A request restores into its own cache, so concurrent
  requests sharing a prefix read the same bytes and never see each other's writes.
* **Opt out.** ``InferenceContext.cache_prompt = False`` (``cache_prompt: false`` in
  ``inferos serve`` requests) neither reuses nor stores. Baseline runs never use the cache.

Sharing and memory
------------------
Full-precision states are split into blocks of ``block_tokens`` tokens keyed by their
hash chain; a block already cached (same ids up to its end) is reused by reference, so N
chats with one system prompt hold its blocks once. Tiered states are kept whole; their
tier arrays are shared by identity with the states they were restored from. Bytes are
counted per distinct array (``bytes_held``); ``logical_bytes`` is what the entries would
take with private copies. Entries beyond ``max_bytes`` are evicted least recently used
first; :meth:`PrefixCache.evict_lru` and :attr:`PrefixCache.bytes_held` are the interface a
process-wide resource manager can call.

Chat templates re-render earlier assistant turns; when the re-tokenized history differs
from the tokens generated, the LCP ends inside the generated part: the state is reused up
to there and ``retokenize_mismatches`` counts it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from ..kv.base import KVCache, KVCacheReuseError, KVSnapshot
from ..types import PrefixCacheStats
from .sampling import log_softmax

log = logging.getLogger("lemonade_inferos.prefix_cache")

DEFAULT_MAX_BYTES = 512 * 1024**2
DEFAULT_BLOCK_TOKENS = 32
DEFAULT_PROBE_TOKENS = 16

#: ``run(cache, ids [1, n] int64, start_pos) -> logits float32 [n, vocab]`` (the engine's model run)
RunFn = Callable[[KVCache, np.ndarray, int], np.ndarray]


ENV_BYTES = "INFEROS_PREFIX_CACHE_BYTES"


def prefix_cache_bytes_from_env(default: int = DEFAULT_MAX_BYTES) -> int:
    """The prefix cache limit from ``INFEROS_PREFIX_CACHE_BYTES`` (bytes, or a size like
    ``512MiB``; 0 = off), else ``default``.

    Raises:
        ValueError: the variable is set but not a size (names it).
    """
    import os

    from ..policy import parse_size

    raw = os.environ.get(ENV_BYTES, "").strip()
    if not raw:
        return default
    return parse_size(int(raw) if raw.isdigit() else raw, field=ENV_BYTES)


def common_prefix_length(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two token id sequences."""
    x, y = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    n = min(x.size, y.size)
    if n == 0:
        return 0
    diff = np.flatnonzero(x[:n] != y[:n])
    return int(diff[0]) if diff.size else n


def mean_nll(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Mean negative log-likelihood (nats/token) of ``targets`` under ``logits``
    (float ``[n, vocab]``, row ``i`` scoring ``targets[i]``)."""
    t = np.asarray(targets, dtype=np.int64)
    if logits.shape[0] != t.size or t.size == 0:
        raise ValueError(f"{logits.shape[0]} logit rows for {t.size} targets")
    lp = log_softmax(logits)
    return float(-lp[np.arange(t.size), t].mean())


class ProbeCost(NamedTuple):
    """What :func:`probe_cost` measured: ``delta_ppl`` (absolute perplexity increase,
    ``PPL_fresh * (exp(kld) - 1)``), ``kld`` (mean KL(fresh ‖ reuse), nats/token) and
    ``delta_nll`` (mean NLL of the probe targets, reuse minus fresh; informational)."""

    delta_ppl: float
    kld: float
    delta_nll: float

    @staticmethod
    def worst(costs: "Sequence[ProbeCost]") -> "ProbeCost | None":
        """Field-wise maximum (None for no costs)."""
        if not costs:
            return None
        return ProbeCost(*(max(c[i] for c in costs) for i in range(3)))


def probe_cost(snap: KVSnapshot, new_cache: KVCache, probe_ids: Sequence[int], fresh_logits: np.ndarray,
               run: RunFn) -> ProbeCost:
    """Measured quality cost of prefilling against the state ``snap`` (see the module
    docstring for the definitions).

    ``snap`` holds ``T`` tokens whose last ``p = len(probe_ids)`` are ``probe_ids`` (at L0).
    The state is restored into ``new_cache`` (an empty cache of the same configuration),
    cut back to ``T - p`` tokens and ``probe_ids[:-1]`` are prefilled again at positions
    ``T - p ...``; their logits predict ``probe_ids[1:]``. ``fresh_logits`` float
    ``[p - 1, vocab]`` are the fresh prefill's logits for the same predictions.

    Raises:
        KVCacheReuseError: the state cannot be cut there.
        ValueError: fewer than 2 probe tokens or mismatched logits.
    """
    p = len(probe_ids)
    if p < 2:
        raise ValueError("probe needs at least 2 tokens")
    new_cache.restore(snap)
    new_cache.truncate(snap.tokens - p)
    ids = np.asarray([list(probe_ids[:-1])], dtype=np.int64)
    logits = run(new_cache, ids, snap.tokens - p)
    targets = list(probe_ids[1:])
    nll_probe = mean_nll(logits, targets)
    nll_fresh = mean_nll(fresh_logits, targets)
    lp_f, lp_p = log_softmax(fresh_logits), log_softmax(logits)
    kld = float(np.mean(np.sum(np.exp(lp_f) * (lp_f - lp_p), axis=-1)))
    return ProbeCost(float(np.exp(min(nll_fresh, 50.0)) * np.expm1(kld)), kld, nll_probe - nll_fresh)


class TailLogits:
    """Stands in for the prefill's chunk consumer (``add(logits, start)``, e.g.
    :class:`~lemonade_inferos.engine.prompt_nll.PromptNLL`): forwards every chunk to
    ``inner`` and keeps a copy of the last ``keep`` logits rows (float32 ``[<= keep, vocab]``,
    :attr:`rows`), which :meth:`PrefixCache.after_prefill` needs for the probe."""

    def __init__(self, inner: object | None, keep: int):
        self.inner, self.keep = inner, int(keep)
        self.rows = np.zeros((0, 0), np.float32)

    def add(self, logits: np.ndarray, start: int) -> None:
        if self.inner is not None:
            self.inner.add(logits, start)  # type: ignore[attr-defined]
        if self.keep:
            last = logits[-self.keep:]
            self.rows = last.copy() if last.shape[0] >= self.keep or not self.rows.size else \
                np.concatenate([self.rows, last])[-self.keep:]


@dataclass(eq=False)
class _Block:
    """``tokens`` consecutive tokens of a full-precision state (arrays read-only)."""

    key: bytes
    tokens: int
    arrays: dict[str, np.ndarray]


@dataclass(eq=False)
class _Entry:
    """One cached sequence: its ids and its state (blocks, or a whole snapshot)."""

    ids: np.ndarray
    reuse_key: str
    prompt_len: int
    blocks: list[_Block] | None = None
    snap: KVSnapshot | None = None
    floor: int = 0
    lossy_tokens: int = 0
    cost: ProbeCost | None = None
    last_used: int = 0
    logical_bytes: int = 0

    @property
    def tokens(self) -> int:
        return int(self.ids.size)

    def arrays(self) -> list[np.ndarray]:
        if self.blocks is not None:
            return [a for b in self.blocks for a in b.arrays.values()]
        assert self.snap is not None
        return list(self.snap.arrays.values())


@dataclass
class Reuse:
    """What :meth:`PrefixCache.begin` did for one request.

    ``start`` = prompt tokens restored from the cache (the engine prefills
    ``prompt[start:]``); ``cost`` the reused state's measured cost (None = exact or
    nothing reused); ``note`` a human-readable line for the request's stats.
    """

    start: int = 0
    cost: ProbeCost | None = None
    lossy: bool = False
    note: str = ""
    enabled: bool = True
    prompt_state: tuple[KVSnapshot, int] | None = field(default=None, repr=False)
    probe: tuple[list[int], np.ndarray] | None = field(default=None, repr=False)


class PrefixCache:
    """Cached KV states by token ids, shared read-only, under a byte limit (LRU).

    Args:
        max_bytes: limit on :attr:`bytes_held` (bytes; 0 disables the cache).
        block_tokens: tokens per shared block of full-precision states (>= 1).
        probe_tokens: prompt tokens used to measure a quantized state's cost (>= 2).

    Thread-safe: every method may be called from concurrent request threads.

    Raises:
        ValueError: a setting is out of range (names it).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 probe_tokens: int = DEFAULT_PROBE_TOKENS):
        if not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens={block_tokens!r} is not allowed; must be an integer >= 1")
        if not isinstance(probe_tokens, int) or probe_tokens < 2:
            raise ValueError(f"probe_tokens={probe_tokens!r} is not allowed; must be an integer >= 2")
        self.block_tokens = block_tokens
        self.probe_tokens = probe_tokens
        self._lock = threading.RLock()
        self._entries: list[_Entry] = []
        self._blocks: dict[bytes, _Block] = {}
        self._refs: dict[int, list] = {}  # id(array) -> [array, refcount]
        self._bytes = 0
        self._config_cost: dict[str, ProbeCost] = {}  # reuse key -> largest probe costs measured
        self._clock = itertools.count(1)
        self._stats = PrefixCacheStats()
        self.max_bytes = 0
        self.set_max_bytes(max_bytes)

    # -- configuration and the resource-manager interface ---------------------------------
    def set_max_bytes(self, max_bytes: int) -> None:
        """Change the byte limit (0 disables the cache and drops every entry).

        Raises:
            ValueError: negative or not an integer (the old limit stays).
        """
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r} is not allowed; must be an integer >= 0 (0 = off)")
        with self._lock:
            self.max_bytes = max_bytes
            self._stats.max_bytes = max_bytes
            self._stats.enabled = max_bytes > 0
            self._shrink_to(max_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes_held(self) -> int:
        """Distinct bytes of every cached state (shared arrays counted once)."""
        return self._bytes

    def evict_lru(self, nbytes: int) -> int:
        """Evict least recently used entries until at least ``nbytes`` bytes are freed or
        nothing is left; returns the bytes freed (an entry's shared blocks free nothing
        while another entry still uses them)."""
        with self._lock:
            target = max(0, self._bytes - max(0, int(nbytes)))
            before = self._bytes
            self._shrink_to(target)
            return before - self._bytes

    def clear(self) -> None:
        """Drop every entry (not counted as evictions)."""
        with self._lock:
            for e in list(self._entries):
                self._remove(e)

    def stats(self) -> PrefixCacheStats:
        """A copy of the counters and what is held now."""
        with self._lock:
            s = PrefixCacheStats(**{k: getattr(self._stats, k) for k in PrefixCacheStats.__dataclass_fields__})
            s.entries = len(self._entries)
            s.blocks = len(self._blocks)
            s.bytes_held = self._bytes
            s.logical_bytes = sum(e.logical_bytes for e in self._entries)
            return s

    # -- accounting ------------------------------------------------------------------------
    def _ref(self, arrays: list[np.ndarray]) -> None:
        for a in arrays:
            r = self._refs.get(id(a))
            if r is None:
                self._refs[id(a)] = [a, 1]
                self._bytes += a.nbytes
            else:
                r[1] += 1

    def _unref(self, arrays: list[np.ndarray]) -> None:
        for a in arrays:
            r = self._refs[id(a)]
            r[1] -= 1
            if r[1] == 0:
                del self._refs[id(a)]
                self._bytes -= a.nbytes

    def _remove(self, e: _Entry) -> None:
        self._entries.remove(e)
        self._unref(e.arrays())
        self._drop_unheld_blocks(e)

    def _shrink_to(self, limit: int) -> None:
        while self._entries and self._bytes > limit:
            e = min(self._entries, key=lambda x: x.last_used)
            before = self._bytes
            self._remove(e)
            self._stats.evictions += 1
            self._stats.evicted_bytes += before - self._bytes

    # -- lookup ----------------------------------------------------------------------------
    def begin(self, ids: Sequence[int], cache: KVCache, *, budget_ppl: float, max_kld: float = float("inf"),
              enabled: bool = True) -> Reuse:
        """Restore into ``cache`` (empty) the longest usable cached prefix of ``ids``.

        Args:
            ids: the prompt's token ids.
            cache: the request's fresh cache.
            budget_ppl: largest measured ΔPPL a quantized state may carry to be reused.
            max_kld: largest measured mean KLD (nats/token) it may carry.
            enabled: False = the request opted out (nothing restored, nothing counted).

        Returns:
            a :class:`Reuse`; ``start`` tokens are in ``cache``.
        """
        key = cache.reuse_key()
        if not enabled or not self.enabled or key is None or len(ids) < 2:
            return Reuse(enabled=False)
        want = np.asarray(ids, dtype=np.int64)
        limit = want.size - 1  # the last prompt token is always prefilled
        with self._lock:
            self._stats.lookups += 1
            self._stats.lookup_tokens += int(want.size)
            best: tuple[int, _Entry] | None = None
            rejected = None
            for e in self._entries:
                if e.reuse_key != key:
                    continue
                n = min(common_prefix_length(e.ids, want), limit)
                if n < e.floor or n == 0:
                    continue
                if e.lossy_tokens and (e.cost is None or e.cost.delta_ppl > budget_ppl or e.cost.kld > max_kld):
                    rejected = e
                    continue
                if best is None or n > best[0]:
                    best = (n, e)
            if best is None:
                if rejected is not None:
                    self._stats.quality_rejects += 1
                    c = rejected.cost
                    cost = "unmeasured" if c is None else f"ΔPPL {c.delta_ppl:+.4f}, KLD {c.kld:.4f}"
                    return Reuse(note=f"prefix cache: quantized state not reused ({cost}; budgets ΔPPL "
                                      f"{budget_ppl:g}, KLD {max_kld:g}); prompt re-prefilled")
                return Reuse()
            n, e = best
            e.last_used = next(self._clock)
            blocks = list(e.blocks) if e.blocks is not None else None
            snap = e.snap
            if e.prompt_len <= n < e.tokens:
                self._stats.retokenize_mismatches += 1
        try:
            if blocks is not None:
                cache.restore(self._assemble(key, blocks, n))
            else:
                assert snap is not None
                cache.restore(snap)
                if n < snap.tokens:
                    cache.truncate(n)
        except KVCacheReuseError as err:  # pragma: no cover - guarded by floor/key checks
            log.warning("prefix cache: restore failed (%s); prefilling the whole prompt", err)
            return Reuse()
        with self._lock:
            self._stats.hits += 1
            self._stats.hit_tokens += n
        lossy = bool(e.lossy_tokens)
        return Reuse(start=n, cost=e.cost if lossy else None, lossy=lossy,
                     note=f"prefix cache: reused {n} of {want.size} prompt tokens" + (
                         f" (quantized state, measured ΔPPL {e.cost.delta_ppl:+.4f}, KLD {e.cost.kld:.4f})"
                         if lossy and e.cost is not None else ""))

    @staticmethod
    def _assemble(key: str, blocks: list[_Block], n: int) -> KVSnapshot:
        """Contiguous arrays of the first ``n`` tokens of ``blocks`` (a new copy)."""
        parts: dict[str, list[np.ndarray]] = {}
        left = n
        for b in blocks:
            if left <= 0:
                break
            take = min(left, b.tokens)
            for name, a in b.arrays.items():
                parts.setdefault(name, []).append(a if take == b.tokens else a[:, :, :take])
            left -= take
        arrays = {name: np.concatenate(p, axis=2) for name, p in parts.items()}
        return KVSnapshot(key, n, arrays, token_axis=2)

    def tail_logits(self, reuse: Reuse, cache: KVCache, inner: object | None) -> TailLogits:
        """The prefill's chunk consumer for this request: ``inner`` plus, when
        :meth:`after_prefill` may probe the state (a store with ``token_axis`` None), the
        last ``probe_tokens`` logits rows."""
        probe = reuse.enabled and self.enabled and cache.token_axis is None
        return TailLogits(inner, self.probe_tokens if probe else 0)

    # -- after the prefill: the prompt's own state, and what the probe needs ----------------
    def after_prefill(self, reuse: Reuse, cache: KVCache, ids: Sequence[int], logits: np.ndarray) -> None:
        """Called right after the prefill of ``ids[reuse.start:]`` (``logits`` float
        ``[n, vocab]``: the last ``n`` prefill rows, at least ``min(probe_tokens, len(ids) -
        start)`` of them, :class:`TailLogits`). For a store that cannot be cut back anywhere
        (``cache.token_axis is None``: the tiered store), keep the prompt's state (a cheap
        snapshot: L0 columns copied, tier arrays shared): the next turn of a chat can reuse
        it even when the re-rendered reply differs from the generated tokens early on (the
        final state can only be cut back to its last quantized block). When that state
        has quantized/evicted tokens and enough prompt tokens were prefilled, also keep the
        fresh logits of the last ``probe_tokens`` prompt tokens for :func:`probe_cost`."""
        if not reuse.enabled or not self.enabled or cache.token_axis is not None or cache.reuse_key() is None:
            return
        snap = cache.snapshot()
        floor = cache.truncate_floor()
        reuse.prompt_state = (snap, floor)
        if not snap.lossy_tokens:
            return
        p = min(self.probe_tokens, len(ids) - reuse.start - 1)
        if p >= 2 and floor <= len(ids) - p:
            reuse.probe = (list(ids[-p:]), np.array(logits[-p:-1], dtype=np.float32))

    # -- store -----------------------------------------------------------------------------
    def _cost(self, key: str, reuse: Reuse, new_cache: Callable[[], KVCache] | None,
              run: RunFn | None) -> ProbeCost | None:
        """The measured cost for a lossy state of this request (see the module docstring)."""
        costs = [] if reuse.cost is None else [reuse.cost]
        if reuse.probe is not None and reuse.prompt_state is not None and new_cache is not None and run is not None:
            pids, fresh = reuse.probe
            try:
                measured = probe_cost(reuse.prompt_state[0], new_cache(), pids, fresh, run)
            except (KVCacheReuseError, ValueError) as err:
                log.info("prefix cache: probe not measured (%s)", err)
            else:
                costs.append(measured)
                with self._lock:
                    self._config_cost[key] = ProbeCost.worst([measured, self._config_cost.get(key, measured)])
        if not costs and key in self._config_cost:
            costs.append(self._config_cost[key])  # the configuration's largest probe so far
        return ProbeCost.worst(costs)

    def store(self, reuse: Reuse, cache: KVCache, fed: Sequence[int], prompt_len: int,
              new_cache: Callable[[], KVCache] | None = None, run: RunFn | None = None) -> None:
        """Keep ``cache``'s state (it holds exactly the tokens ``fed``), and the prompt's
        state kept by :meth:`after_prefill` when the final state cannot be cut back to the
        prompt.

        Args:
            reuse: what :meth:`begin` returned for this request.
            fed: the token ids the cache holds (prompt + generated tokens fed back).
            prompt_len: how many of ``fed`` were the prompt.
            new_cache / run: an empty cache of the same configuration and the model run,
                for measuring a quantized state's cost (:func:`probe_cost`).
        """
        key = cache.reuse_key()
        if not reuse.enabled or not self.enabled or key is None or len(fed) < 1:
            return
        if cache.seq_length != len(fed):
            log.warning("prefix cache: cache holds %d tokens but %d ids were fed; not stored", cache.seq_length, len(fed))
            return
        snap = cache.snapshot()
        ps = reuse.prompt_state
        lossy = snap.lossy_tokens or (ps is not None and ps[0].lossy_tokens)
        cost = self._cost(key, reuse, new_cache, run) if lossy else None
        ids = np.asarray(fed, dtype=np.int64)
        floor = cache.truncate_floor()
        with self._lock:
            self._insert(self._entry(snap, ids, key, prompt_len, cost, floor))
            if ps is not None and floor > prompt_len and ps[0].tokens == prompt_len:
                self._insert(self._entry(ps[0], ids[:prompt_len], key, prompt_len, cost, ps[1]))
            self._shrink_to(self.max_bytes)

    def _entry(self, snap: KVSnapshot, ids: np.ndarray, key: str, prompt_len: int, cost: ProbeCost | None,
               floor: int) -> _Entry:
        e = _Entry(ids=ids, reuse_key=key, prompt_len=int(prompt_len), lossy_tokens=snap.lossy_tokens,
                   cost=cost if snap.lossy_tokens else None, last_used=next(self._clock),
                   logical_bytes=snap.nbytes)
        if snap.token_axis == 2 and not snap.lossy_tokens:
            e.blocks = self._blocks_of(snap, ids)
        else:
            e.snap, e.floor = snap, int(floor)
        return e

    def _insert(self, entry: _Entry) -> None:
        """Add ``entry`` unless an entry serves every prefix it serves; drop entries it
        serves entirely (same configuration, their ids a prefix of its ids, floor not
        lower than its floor)."""
        if entry.logical_bytes > self.max_bytes:
            self._drop_unheld_blocks(entry)  # larger than the whole cache
            return
        for e in list(self._entries):
            if e.reuse_key != entry.reuse_key:
                continue
            n = common_prefix_length(e.ids, entry.ids)
            if n == e.tokens and entry.floor <= e.floor:
                self._remove(e)  # superseded
            elif n == entry.tokens and e.floor <= entry.floor:
                e.last_used = next(self._clock)  # already covered
                self._drop_unheld_blocks(entry)
                return
        self._ref(entry.arrays())
        self._entries.append(entry)

    def _drop_unheld_blocks(self, entry: _Entry) -> None:
        """Forget the blocks of an entry that was not added and that no entry holds."""
        for b in entry.blocks or ():
            if id(next(iter(b.arrays.values()))) not in self._refs:
                self._blocks.pop(b.key, None)

    def _blocks_of(self, snap: KVSnapshot, ids: np.ndarray) -> list[_Block]:
        """Split a full-precision snapshot into blocks; blocks already cached under the same
        hash chain are reused (the new copies are dropped)."""
        out: list[_Block] = []
        h = hashlib.sha256(snap.reuse_key.encode())
        bt = self.block_tokens
        for start in range(0, snap.tokens, bt):
            end = min(start + bt, snap.tokens)
            h.update(ids[start:end].tobytes())
            key = h.copy()
            key.update(f"|{end}".encode())
            k = key.digest()
            b = self._blocks.get(k)
            if b is None:
                arrays = {}
                for name, a in snap.arrays.items():
                    blk = np.ascontiguousarray(a[:, :, start:end])
                    blk.flags.writeable = False
                    arrays[name] = blk
                b = _Block(k, end - start, arrays)
                self._blocks[k] = b
            out.append(b)
        return out

    def entries(self) -> list[Mapping[str, object]]:
        """What is cached (for debugging and tests): ids length, bytes, cost, kind."""
        with self._lock:
            return [{"tokens": e.tokens, "prompt_len": e.prompt_len, "kind": "blocks" if e.blocks is not None else "snapshot",
                     "lossy_tokens": e.lossy_tokens, "cost": e.cost, "logical_bytes": e.logical_bytes,
                     "floor": e.floor} for e in self._entries]
