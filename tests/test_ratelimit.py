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


@pytest.mark.parametrize(("per_minute", "burst", "shown"), [(600, 1, "1 s"), (40, 1, "2 s"), (2, 1, "30 s")])
def test_waits_round_up_and_never_read_zero(per_minute: int, burst: int, shown: str):
    limiter = RateLimiter(per_minute=per_minute, burst=burst)
    limiter.check("a")
    with pytest.raises(RateLimitedError, match=f"please wait {shown} and try again"):
        limiter.check("a")


@pytest.mark.parametrize(("flags", "env", "expected"), [
    ([], {}, 0),  # 127.0.0.1: only this machine's own clients
    (["--host", "localhost"], {}, 0),
    (["--host", "::1"], {}, 0),
    (["--host", "0.0.0.0"], {}, 30),  # every interface: public
    (["--host", "192.168.1.20"], {}, 30),
    ([], {"SPACE_ID": "someone/blip"}, 30),  # on a Space
    (["--host", "0.0.0.0", "--rate-limit", "0"], {}, 0),  # an operator may still turn it off
    (["--rate-limit", "5"], {}, 5),
    ([], {"BLIP_APP_RATE_LIMIT": "12"}, 12),
])
def test_the_limit_is_on_by_default_only_where_the_app_is_public(monkeypatch, flags, env, expected):
    from blip_app.config import parse_config

    for name in ("SPACE_ID", "BLIP_APP_RATE_LIMIT", "BLIP_APP_HOST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert parse_config(["--model", "blip2-opt-2.7b", *flags]).rate_limit_per_minute == expected


def test_a_local_script_of_40_captions_in_a_row_is_never_refused(tiny_checkpoints, tmp_path) -> None:
    """The README tells scripts to call /caption once per image; the default limit used to refuse the 11th."""
    from _server import running_app
    from gradio_client import Client, handle_file
    from PIL import Image

    picture = tmp_path / "forty.png"
    Image.new("RGB", (32, 32), "teal").save(picture)
    model = str(tiny_checkpoints["blip2-opt"])
    with running_app([model], "--trust-model", "none") as app:  # the default flags: no --rate-limit
        client = Client(app.url, verbose=False)
        for _ in range(40):
            assert isinstance(client.predict(handle_file(str(picture)), model, "fast", 2, 1, api_name="/caption"), str)
