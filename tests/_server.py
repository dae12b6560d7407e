"""Run the real app (app.create_app + server.launch) on a free loopback port in this process, for tests.

The server runs in gradio's own background thread (``prevent_thread_lock=True``); :func:`running_app`
stops it and frees the models on exit. Every option is passed as a flag, so BLIP_APP_* variables in
the environment cannot change what the tests see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class RunningApp:
    """A served app: its URL, the gr.Blocks and the Service behind it."""

    url: str
    demo: Any
    service: Any


def wait_until(condition, timeout: float, every: float = 0.05) -> bool:
    """Poll ``condition`` every ``every`` seconds until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_app(models: Sequence[str | os.PathLike[str]], *extra_flags: str,
                cache_dir: str | os.PathLike[str] | None = None) -> Iterator[RunningApp]:
    """Serve the app offering ``models`` (names or checkpoint folders) on 127.0.0.1; stop it afterwards.

    ``cache_dir`` replaces the Hugging Face cache the models are looked up in (see ``fake_hub_cache``).
    """
    flags = [flag for model in models for flag in ("--model", str(model))]
    flags += ["--host", "127.0.0.1", "--offline", *extra_flags]  # loopback: no rate limit unless given
    with _pillow_globals_restored():
        yield from _serve(flags, cache_dir)


@contextlib.contextmanager
def _pillow_globals_restored() -> Iterator[None]:
    """server.launch() sets Pillow's process-wide decompression-bomb limit: undo it for the other tests."""
    import PIL.Image

    limit = PIL.Image.MAX_IMAGE_PIXELS
    try:
        yield
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = limit


def _serve(flags: list[str], cache_dir: str | os.PathLike[str] | None) -> Iterator[RunningApp]:
    import app as app_module
    from blip_app.config import parse_config
    from blip_app.models.loading import Loader
    from blip_app.models.manager import ModelManager
    from blip_app.web import server

    last_error: OSError | None = None
    for _ in range(3):  # another process may grab the port between free_port() and launch
        config = parse_config([*flags, "--port", str(free_port())])
        manager = None
        if cache_dir is not None:
            options = dataclasses.replace(config.load, cache_dir=str(cache_dir))
            manager = ModelManager(config.models, options, loader=Loader(), memory_budget_gb=config.memory_budget_gb)
        demo, service = app_module.create_app(config, manager=manager)
        try:
            url = server.launch(demo, config, service=service, prevent_thread_lock=True, quiet=True)
        except OSError as exc:
            last_error = exc
            continue
        try:
            yield RunningApp(url=url, demo=demo, service=service)
        finally:
            demo.close()
            service.manager.close()
        return
    raise RuntimeError(f"Could not start the app on a free port: {last_error}")


def fake_hub_cache(cache_dir: str | os.PathLike[str], repos: Mapping[str, str | os.PathLike[str]]) -> Path:
    """Lay out a Hugging Face hub cache in which each repository id holds a copy of a local checkpoint.

    ``{"Salesforce/blip2-opt-2.7b": tiny_folder}``: the app then offers the catalog's names and finds
    them "downloaded", while the files are the tiny checkpoint's (used offline, never uploaded).
    """
    root = Path(cache_dir)
    for repo_id, folder in repos.items():
        repo = root / ("models--" + repo_id.replace("/", "--"))
        commit = "0" * 40
        shutil.copytree(folder, repo / "snapshots" / commit, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return root
