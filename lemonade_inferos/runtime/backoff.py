"""Exponential backoff with jitter, one per fallback reason (the guide's BackoffStrategy:
delay_n = min(delay_{n-1} × multiplier, max) plus 10-30 % random jitter; the first delay
is ``initial``)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Backoff:
    """Args: initial, maximum (seconds); multiplier (>= 1); jitter (lo, hi) fractions;
    rng: uniform [0, 1) source (injectable for deterministic tests)."""

    initial: float
    maximum: float
    multiplier: float = 2.0
    jitter: tuple[float, float] = (0.1, 0.3)
    rng: Callable[[], float] = field(default=random.random, repr=False)
    attempts: int = 0
    current: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.multiplier < 1:
            raise ValueError(f"backoff needs 0 < initial <= maximum and multiplier >= 1; got {self.initial}, "
                             f"{self.maximum}, {self.multiplier}")

    def next_delay(self) -> float:
        """The delay (s) before the next attempt; grows with each call."""
        if self.attempts == 0:
            d = self.initial
        else:
            base = min(self.current * self.multiplier, self.maximum)
            lo, hi = self.jitter
            d = base * (1 + lo + (hi - lo) * self.rng())
        self.current = min(d, self.maximum)
        self.attempts += 1
        return d

    def reset(self) -> None:
        self.attempts, self.current = 0, 0.0
