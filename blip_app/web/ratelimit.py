"""A simple per-client rate limit: a token bucket per client key (an IP address or a user name)."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict

from blip_app.errors import RateLimitedError

TOO_QUICK = "You are sending requests too quickly; please wait {wait:.0f} s and try again."


class RateLimiter:
    """Allows ``per_minute`` requests a minute per client, in bursts of up to ``burst``.

    ``message`` is the refusal's sentence; ``{wait}`` is replaced by the seconds to wait, rounded up (a
    wait of 0.2 s reads "1 s", never "0 s").
    """

    def __init__(self, per_minute: int, *, burst: int | None = None, max_clients: int = 10_000,
                 message: str = TOO_QUICK) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1, per_minute // 3))
        self.max_clients = max_clients
        self.message = message
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def check(self, client: str | None) -> None:
        """Take one request from ``client``'s allowance, or raise RateLimitedError saying how long to wait."""
        if self.rate <= 0:
            return
        key = client or "anonymous"
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise RateLimitedError(self.message.format(wait=max(1, math.ceil(wait))))
            self._buckets[key] = (tokens - 1.0, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
