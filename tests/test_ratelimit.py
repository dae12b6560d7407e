"""The per-client rate limit."""

from __future__ import annotations

import time

import pytest

from blip_app.errors import RateLimitedError
from blip_app.web.ratelimit import RateLimiter


def test_each_client_gets_its_own_allowance_and_it_refills():
    limiter = RateLimiter(per_minute=600, burst=3)  # ten a second
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(RateLimitedError, match="please wait"):
        limiter.check("a")
    limiter.check("b")  # another client is not affected
    time.sleep(0.15)
    limiter.check("a")


def test_zero_means_no_limit():
    limiter = RateLimiter(per_minute=0)
    for _ in range(1000):
        limiter.check("a")


def test_memory_is_bounded():
    limiter = RateLimiter(per_minute=60, max_clients=100)
    for index in range(1000):
        limiter.check(f"client-{index}")
    assert len(limiter._buckets) == 100
