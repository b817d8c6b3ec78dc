"""Keeping a platform's API calls under its rate limit, whatever 429s it would send.

A `Pace` is a moving-window limit of so many requests per second, kept by the `limits`
library. Its storage decides who shares the budget: `memory://` (the default) is one
process; `redis://host:6379` (`RECON_REDIS_URL`) is every process and machine pointed at
that Redis, so several workers together stay under the platform's limit. A request that
would go over waits until the window has room; the platform's own 429s are still
retried by the connector's tenacity layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from limits import RateLimitItemPerSecond, storage, strategies

# The platforms' documented limits (Stripe: 100/s live, 25/s sandbox, 25/s per endpoint;
# Orb publishes none), as defaults a config may lower or raise.
DEFAULT_PER_SECOND = {"stripe": 25, "orb": 20}


@dataclass
class Pace:
    per_second: int
    key: str  # what shares the budget: the platform and its account
    storage_url: str = "memory://"
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        self._item = RateLimitItemPerSecond(self.per_second)
        self._limiter = strategies.MovingWindowRateLimiter(storage.storage_from_string(self.storage_url))

    def wait(self) -> float:
        """Take one request's place in the window, waiting for room; the seconds waited."""
        waited = 0.0
        while not self._limiter.hit(self._item, "recon", self.key):
            reset, _ = self._limiter.get_window_stats(self._item, "recon", self.key)
            pause = min(max(reset - time.time(), 0.001), 1.0)
            self.sleep(pause)
            waited += pause
        return waited


def pace_for(platform: str, account: str, rules: dict[str, object], storage_url: str | None) -> Pace:
    """The pace of `platform` calls: `[stripe]`/`[orb] requests_per_second` or the default."""
    per_second = rules.get("requests_per_second", DEFAULT_PER_SECOND[platform])
    assert isinstance(per_second, int)
    return Pace(per_second, f"{platform}:{account}", storage_url or "memory://")
