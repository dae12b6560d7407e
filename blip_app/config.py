"""Settings read once at start-up, from command-line flags and environment variables (for Spaces).

Every option has one default, written here, and an environment variable named ``BLIP_APP_<OPTION>``.
A flag wins over its variable.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from blip_app.core.catalog import DEFAULT_RETRIEVAL_MODEL
from blip_app.core.devices import PRECISIONS, QUANTIZATIONS, LoadOptions
from blip_app.core.images import ImageLimits
from blip_app.core.remote import is_remote, parse_remote
from blip_app.core.settings import Limits
from blip_app.errors import UnknownModelError

# Offered when no --model is given: small enough for a CPU or a free GPU, one of each family.
DEFAULT_MODELS = ("blip2-opt-2.7b", "blip2-flan-t5-xl", "instructblip-flan-t5-xl", "instructblip-vicuna-7b")
# The image-text matching model behind trust scores and search.
DEFAULT_TRUST_MODEL = DEFAULT_RETRIEVAL_MODEL
# Requests a minute per client where the app is public (see is_public); a local app has no limit, so that a
# script captioning a folder one /caption call at a time, as the README advises, is never refused.
PUBLIC_RATE_LIMIT = 30


@dataclass(frozen=True)
class AppConfig:
    """Everything the app needs to know at start-up."""

    models: tuple[str, ...] = DEFAULT_MODELS
    default_model: str = DEFAULT_MODELS[0]
    load: LoadOptions = field(default_factory=LoadOptions)
    memory_budget_gb: float | None = None  # None: 90% of the GPU or 80% of RAM
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: float = 20.0
    queue_size: int = 32
    auth: tuple[str, str] | None = None
    limits: Limits = field(default_factory=Limits)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    max_message_chars: int = 2000
    time_limit_s: float = 300.0
    rate_limit_per_minute: int = 30  # parse_config: 30 where the app is public, else 0 (public_by_default)
    preload: bool = False  # load the default model at start-up instead of on first use
    delete_uploads_after_s: int = 3600
    # Trust scores and search: the image-text matching model, offered beside the captioning models (None: off).
    trust_model: str | None = DEFAULT_TRUST_MODEL
    trust: bool = True  # score every caption and answer in the Caption and Ask tabs
    max_batch_images: int = 100  # images one Batch run in the page may caption
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the client; none: the peer is the client
    trusted_proxies: tuple[str, ...] = ()
    # The key /v1 requires as "Authorization: Bearer <key>" (None: /v1 is open, like the page's API)
    api_key: str | None = field(default=None, repr=False)

    @property
    def offered_models(self) -> tuple[str, ...]:
        """Every model the service offers: the captioning models, then the image-text matching one."""
        return self.models + ((self.trust_model,) if self.trust_model else ())


def is_public(host: str, on_spaces: bool) -> bool:
    """Whether clients other than this machine can reach the app: on a Space, or listening beyond loopback."""
    if on_spaces:
        return True
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return False
    try:
        return not ipaddress.ip_address(name).is_loopback
    except ValueError:
        return True  # a host name that may resolve to any interface


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"BLIP_APP_{name}")
    return value if value not in (None, "") else default


def build_parser() -> argparse.ArgumentParser:
    """The app's command-line flags."""
    parser = argparse.ArgumentParser(
        prog="app.py", description="Talk with images through BLIP-2 and InstructBLIP in the browser."
    )
    parser.add_argument("--model", action="append", dest="models", metavar="NAME_OR_PATH",
                        help="a model to offer (repeatable): catalog name, hub id, checkpoint folder, or "
                             "remote:<base URL>#<model id> for a model another OpenAI-compatible server runs "
                             "[BLIP_APP_MODELS, comma-separated]")
    parser.add_argument("--default-model", help="the model selected at start [BLIP_APP_DEFAULT_MODEL]")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N [BLIP_APP_DEVICE]")
    parser.add_argument("--precision", choices=PRECISIONS, help="weights dtype [BLIP_APP_PRECISION]")
    parser.add_argument("--quantization", choices=QUANTIZATIONS,
                        help="int4-weight-only (recommended on a CPU) / int8-weight-only: torchao, faster decode; "
                             "8bit/4bit: bitsandbytes (GPU memory); int8-cpu: torch dynamic int8 "
                             "[BLIP_APP_QUANTIZATION]")
    parser.add_argument("--no-cpu-speedups", action="store_true", default=None,
                        help="on a CPU, keep models exactly as loaded: no resident copy, no packed kernels "
                             "[BLIP_APP_CPU_SPEEDUPS=0]")
    parser.add_argument("--static-cache", action="store_true", default=None,
                        help="GPU fast path: static key/value cache and a compiled decode step "
                             "[BLIP_APP_STATIC_CACHE=1]")
    parser.add_argument("--memory-budget-gb", type=float,
                        help="memory the loaded models may take [BLIP_APP_MEMORY_BUDGET_GB]")
    parser.add_argument("--host", help="interface to listen on [BLIP_APP_HOST]; 0.0.0.0 on Spaces")
    parser.add_argument("--port", type=int, help="port [BLIP_APP_PORT, GRADIO_SERVER_PORT]")
    parser.add_argument("--max-upload-mb", type=float, help="largest upload accepted [BLIP_APP_MAX_UPLOAD_MB]")
    parser.add_argument("--queue-size", type=int, help="requests waiting at most [BLIP_APP_QUEUE_SIZE]")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="require a login [BLIP_APP_AUTH]")
    parser.add_argument("--max-new-tokens-cap", type=int, help="server cap on new tokens [BLIP_APP_MAX_NEW_TOKENS_CAP]")
    parser.add_argument("--beams-cap", type=int, help="server cap on beams [BLIP_APP_BEAMS_CAP]")
    parser.add_argument("--time-limit", type=float, help="seconds a generation may take [BLIP_APP_TIME_LIMIT]")
    parser.add_argument("--preload", action="store_true", default=None,
                        help="load the default model at start-up [BLIP_APP_PRELOAD=1]")
    parser.add_argument("--offline", action="store_true", default=None,
                        help="never download; local cache and folders only [BLIP_APP_OFFLINE=1, HF_HUB_OFFLINE=1]")
    parser.add_argument("--rate-limit", type=int,
                        help=f"requests a minute per client, 0 for no limit (default {PUBLIC_RATE_LIMIT} on a Space or "
                             "when listening beyond loopback, else none) [BLIP_APP_RATE_LIMIT]")
    parser.add_argument("--delete-uploads-after", type=int, metavar="SECONDS",
                        help="delete uploaded images this long after they arrive; 0 keeps them "
                             "(default 3600) [BLIP_APP_DELETE_UPLOADS_AFTER]")
    parser.add_argument("--trust-model", metavar="NAME_OR_PATH",
                        help=f"image-text matching model for trust scores and search (default {DEFAULT_TRUST_MODEL}); "
                             "'none' turns both off [BLIP_APP_TRUST_MODEL]")
    parser.add_argument("--trust", choices=("on", "off"),
                        help="score every caption and answer (default on; 'off' keeps the search tab and the "
                             "/trust endpoint) [BLIP_APP_TRUST]")
    parser.add_argument("--max-batch-images", type=int,
                        help="images one Batch run in the page may caption (default 100) [BLIP_APP_MAX_BATCH_IMAGES]")
    parser.add_argument("--trusted-proxy", action="append", dest="trusted_proxies", metavar="ADDRESS",
                        help="a reverse proxy in front of the app (IP address or network, repeatable) whose "
                             "X-Forwarded-For header names the client, for the rate limit; by default the header "
                             "is ignored (on Spaces, the entry the platform's proxy adds is used) "
                             "[BLIP_APP_TRUSTED_PROXIES, comma-separated]")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require this key as 'Authorization: Bearer KEY' on the OpenAI-compatible /v1 "
                             "routes [BLIP_APP_API_KEY; the variable keeps it out of the process list]")
    return parser


def _flag(value: object, env: str, default: object) -> object:
    return value if value is not None else (_env(env) if _env(env) is not None else default)


def _truthy(value: object) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def parse_config(argv: Sequence[str] | None = None) -> AppConfig:
    """Read flags (``argv``) and environment variables into an AppConfig; exits with usage on bad flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    models = tuple(args.models or [m.strip() for m in (_env("MODELS") or "").split(",") if m.strip()]) or DEFAULT_MODELS
    default_model = str(_flag(args.default_model, "DEFAULT_MODEL", models[0]))
    for name in models:
        if is_remote(name):
            try:
                parse_remote(name)
            except UnknownModelError as exc:
                parser.error(str(exc))
    if default_model not in models:
        parser.error(f"--default-model {default_model} is not among the offered models: {', '.join(models)}")
    precision = str(_flag(args.precision, "PRECISION", "auto"))
    quantization = str(_flag(args.quantization, "QUANTIZATION", "none"))
    if precision not in PRECISIONS:
        parser.error(f"BLIP_APP_PRECISION must be one of {', '.join(PRECISIONS)}")
    if quantization not in QUANTIZATIONS:
        parser.error(f"BLIP_APP_QUANTIZATION must be one of {', '.join(QUANTIZATIONS)}")
    offline = _truthy(_flag(args.offline, "OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0")))
    speedups = not args.no_cpu_speedups and _truthy(_env("CPU_SPEEDUPS") or "1")
    static_cache = bool(args.static_cache) or _truthy(_env("STATIC_CACHE") or "0")
    load = LoadOptions(device=str(_flag(args.device, "DEVICE", "auto")), precision=precision,
                       quantization=quantization, local_files_only=offline, cpu_speedups=speedups,
                       static_cache=static_cache)
    on_spaces = bool(os.environ.get("SPACE_ID"))
    auth = None
    auth_text = _flag(args.auth, "AUTH", None)
    if auth_text:
        user, sep, password = str(auth_text).partition(":")
        if not sep or not user or not password:
            parser.error("--auth must look like USER:PASSWORD")
        auth = (user, password)
    budget = _flag(args.memory_budget_gb, "MEMORY_BUDGET_GB", None)
    limits = Limits(
        max_new_tokens=int(_flag(args.max_new_tokens_cap, "MAX_NEW_TOKENS_CAP", Limits.max_new_tokens)),
        num_beams=int(_flag(args.beams_cap, "BEAMS_CAP", Limits.num_beams)),
    )
    trust_model: str | None = str(_flag(args.trust_model, "TRUST_MODEL", DEFAULT_TRUST_MODEL)).strip()
    if trust_model.lower() in ("", "none", "off"):
        trust_model = None
    elif trust_model in models:
        parser.error(f"--trust-model {trust_model} is also offered as a captioning model (--model); an image-text "
                     "matching model cannot caption")
    trust = str(_flag(args.trust, "TRUST", "on")).strip().lower()
    if trust not in ("on", "off", "1", "0", "true", "false", "yes", "no"):
        parser.error("BLIP_APP_TRUST must be on or off")
    max_batch_images = int(_flag(args.max_batch_images, "MAX_BATCH_IMAGES", 100))
    if max_batch_images < 1:
        parser.error("--max-batch-images must be at least 1")
    proxies = args.trusted_proxies or [p for p in (_env("TRUSTED_PROXIES") or "").split(",") if p.strip()]
    trusted_proxies = []
    for proxy in proxies:
        try:
            trusted_proxies.append(str(ipaddress.ip_network(proxy.strip(), strict=False)))
        except ValueError:
            parser.error(f"--trusted-proxy {proxy.strip()!r} is not an IP address or network (such as 10.0.0.0/8)")
    port = _flag(args.port, "PORT", os.environ.get("GRADIO_SERVER_PORT", "7860"))
    host = str(_flag(args.host, "HOST", "0.0.0.0" if on_spaces else "127.0.0.1"))
    rate_limit = int(_flag(args.rate_limit, "RATE_LIMIT", PUBLIC_RATE_LIMIT if is_public(host, on_spaces) else 0))
    max_upload_mb = float(_flag(args.max_upload_mb, "MAX_UPLOAD_MB", 20.0))
    return AppConfig(
        models=models,
        default_model=default_model,
        load=load,
        memory_budget_gb=float(budget) if budget is not None else None,
        host=host,
        port=int(port),
        max_upload_mb=max_upload_mb,
        # one limit: gradio answers 413 above it, and load_image refuses the same size
        image_limits=ImageLimits(max_bytes=int(max_upload_mb * 1024 * 1024)),
        rate_limit_per_minute=rate_limit,
        queue_size=int(_flag(args.queue_size, "QUEUE_SIZE", 32)),
        auth=auth,
        limits=limits,
        time_limit_s=float(_flag(args.time_limit, "TIME_LIMIT", 300.0)),
        preload=_truthy(_flag(args.preload, "PRELOAD", "0")),
        delete_uploads_after_s=_seconds(parser, "--delete-uploads-after",
                                        _flag(args.delete_uploads_after, "DELETE_UPLOADS_AFTER", 3600)),
        trust_model=trust_model,
        trust=trust_model is not None and (trust == "on" or _truthy(trust)),
        max_batch_images=max_batch_images,
        trusted_proxies=tuple(trusted_proxies),
        api_key=str(_flag(args.api_key, "API_KEY", "")).strip() or None,
    )


def _seconds(parser: argparse.ArgumentParser, flag: str, value: object) -> int:
    """A whole, non-negative number of seconds, or a usage error naming the flag."""
    try:
        number = int(str(value))
    except ValueError:
        parser.error(f"{flag} must be a whole number of seconds, not {value!r}")
    if number < 0:
        parser.error(f"{flag} must be 0 or more seconds")
    return number
