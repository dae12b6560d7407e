"""Remote model names: a model that another OpenAI-compatible server runs, offered in this app's picker.

Syntax (``--model`` or ``BLIP_APP_MODELS``)::

    remote:<base URL>#<model id>
    remote:http://10.0.0.7:7860/v1#blip2-opt-2.7b        another blip_app's /v1
    remote:http://gpu-box:8000/v1#Salesforce/blip2-opt-2.7b   vLLM serving BLIP-2 OPT

The base URL is the one an OpenAI client is given (it ends in ``/v1`` for blip_app and vLLM); the model
id after ``#`` is the name that server lists under ``GET <base>/models``. The key for a server that
requires one is read from ``BLIP_APP_REMOTE_API_KEY`` (one key for every remote server), never written
into the model name, which the page shows. Plain data, no network: parsing happens at start-up, so a
mistyped name stops the app with a usage error instead of failing on first use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from blip_app.errors import UnknownModelError

PREFIX = "remote:"
API_KEY_VARIABLE = "BLIP_APP_REMOTE_API_KEY"


@dataclass(frozen=True)
class RemoteTarget:
    """Where a remote model lives: the server's OpenAI base URL and the model id it lists."""

    base_url: str  # without a trailing slash, e.g. http://10.0.0.7:7860/v1
    model: str

    @property
    def host(self) -> str:
        """host:port, for labels and messages."""
        return urlsplit(self.base_url).netloc

    @property
    def label(self) -> str:
        """The picker's short label: ``model @ host:port``."""
        return f"{self.model} @ {self.host}"


@dataclass
class Health:
    """What the last contact with a remote model's server showed (the manager keeps one per model)."""

    ok: bool | None = None  # None: not contacted yet
    detail: str = ""
    at: float = 0.0  # time.time() of the last contact

    def record(self, ok: bool, detail: str) -> None:
        """Note the outcome of a contact."""
        self.ok, self.detail, self.at = ok, detail, time.time()


def is_remote(name: str) -> bool:
    """Whether a model name uses the ``remote:`` syntax."""
    return (name or "").strip().lower().startswith(PREFIX)


def parse_remote(name: str) -> RemoteTarget:
    """The target of a ``remote:<base URL>#<model id>`` name; UnknownModelError naming what is wrong."""
    text = (name or "").strip()
    if not is_remote(text):
        raise UnknownModelError(f"{text!r} is not a remote model name (remote:<base URL>#<model id>).")
    rest = text[len(PREFIX):]
    url, sep, model = rest.partition("#")
    example = "remote:http://10.0.0.7:7860/v1#blip2-opt-2.7b"
    if not sep or not model.strip():
        raise UnknownModelError(f"The remote model {text!r} names no model: add '#<model id>' after the URL, "
                                f"as in {example}.")
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises ValueError on a port that is not a number
    except ValueError as exc:
        raise UnknownModelError(f"The remote model {text!r} has a malformed URL ({exc}).") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnknownModelError(f"The remote model {text!r} needs an http:// or https:// URL with a host, "
                                f"as in {example}.")
    if parts.username or parts.password:
        raise UnknownModelError(f"The remote model {text!r} has a user or password in its URL, which the page "
                                f"would show: set the key in {API_KEY_VARIABLE} instead.")
    if parts.query or parts.fragment:
        raise UnknownModelError(f"The remote model {text!r} has a query in its URL; give the base URL only.")
    del port
    return RemoteTarget(base_url=url.strip().rstrip("/"), model=model.strip())
