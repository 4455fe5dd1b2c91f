"""Next-token selection: greedy and sampling (temperature, top-k, top-p, repetition penalty).

Pure numpy functions over one logits row ``[vocab]`` float32. The order of the transforms
follows Hugging Face ``generate`` (repetition penalty → temperature → top-k → top-p), and
the repetition penalty is CTRL's (Keskar et al. 2019): positive logits of already-seen
tokens are divided by the penalty, negative ones multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenerationConfig:
    """How to generate.

    Attributes:
        max_new_tokens: generated-token limit (>= 1); the context length also caps it.
        temperature: 0 = greedy; > 0 scales logits before sampling.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass in (0, 1] (1 = off).
        repetition_penalty: >= 1 (1 = off), applied to tokens of prompt and output.
        seed: seed of the sampler's numpy Generator (None = fresh entropy).
        stop: strings that end generation; the text is cut before the first one.
        stop_on_eos: stop at the model's EOS token(s).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_on_eos: bool = True

    def validate(self) -> "GenerationConfig":
        """Check every field; raises ``ValueError`` naming the field, the value and the range."""
        checks = [
            ("max_new_tokens", self.max_new_tokens, isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty >= 1, ">= 1 (1 = off)"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is not allowed; must be {allowed}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} is not allowed; must be a list of non-empty strings")
        return self


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL repetition penalty on ``logits`` [vocab] for token ids ``seen`` (1-D int)."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    ids = np.unique(seen)
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def top_k_top_p_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Set to ``-inf`` the logits outside the top-k and outside the top-p nucleus.

    Always keeps at least the most likely token.
    """
    out = logits.astype(np.float64, copy=True)
    if 0 < top_k < out.size:
        kth = np.partition(out, -top_k)[-top_k]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out)
        sorted_logits = out[order]
        probs = np.exp(sorted_logits - sorted_logits[0])
        probs /= probs.sum()
        cum = np.cumsum(probs)
        cut = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix with mass >= top_p
        out[order[cut:]] = -np.inf
    return out


def select_token(logits: np.ndarray, cfg: GenerationConfig, seen: np.ndarray, rng: np.random.Generator) -> int:
    """Choose the next token id from ``logits`` [vocab] under ``cfg``."""
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0.0:
        return int(np.argmax(logits))
    # shift before scaling, in float64: a tiny temperature (down to 5e-324) sends every
    # non-maximal logit to -inf (greedy in the limit) instead of overflowing to inf - inf = NaN
    with np.errstate(over="ignore"):
        scaled = top_k_top_p_filter((logits - logits.max()) / np.float64(cfg.temperature), cfg.top_k, cfg.top_p)
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax in float64."""
    x = x.astype(np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))
