"""Added latency of the OpenAI-compatible /v1 and of a remote model against a direct call (docs/openai-api.md).

    python scripts/measure_openai.py [--rounds 30] [--tokens 8] [--model-dir DIR]

Three ways to caption one photo with the same tiny checkpoint and the same settings, measured in
rounds A B C A B C ... (paired, so that a slow moment of the machine hits all three alike):

A. direct: ``Service.run`` in this process (the model loaded here);
B. /v1: the openai SDK in this process against a second process (``python app.py``) that serves the
   same checkpoint: JSON, base64 of the image file, HTTP and the server's own checks on top of A;
C. remote: ``Service.run`` in this process on ``remote:<that server>/v1#<model>``: the remote client
   (a BMP of the decoded image, streamed events) on top of B's server side.

Each server and this process run one torch thread. Prints the per-round differences B - A and C - A
in milliseconds (median, min, max) and the ratios B / A and C / A.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXAMPLE = ROOT / "assets" / "examples" / "chelsea.jpg"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server at {url} did not start")


def _summary(values: list[float]) -> str:
    return f"median {statistics.median(values):8.2f}   min {min(values):8.2f}   max {max(values):8.2f}"


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per caption")
    parser.add_argument("--model-dir", help="a checkpoint folder (default: a tiny BLIP-2 OPT built now)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import openai

    from blip_app.core.images import load_image
    from blip_app.core.settings import Task
    from blip_app.tasks.service import Service

    folder = args.model_dir
    if folder is None:
        from blip_app.devtools.tiny import make_tiny_checkpoint

        folder = str(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "blip2-opt", "blip2-opt"))
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", folder, "--offline", "--trust-model",
                               "none", "--port", str(port), "--rate-limit", "0"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        _wait(base + "/models")
        picture = load_image(EXAMPLE)
        data_url = "data:image/jpeg;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
        overrides = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "num_beams": 1}
        direct = Service([folder])
        remote_name = f"remote:{base}#{folder}"
        remote = Service([remote_name])
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)

        def run_direct() -> str:
            return direct.run(folder, picture, direct.request(Task.CAPTION, overrides=overrides)).text

        def run_v1() -> str:
            reply = client.chat.completions.create(
                model=folder, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
                    "url": data_url}}]}], max_tokens=args.tokens,
                extra_body={"min_new_tokens": args.tokens, "beams": 1})
            return reply.choices[0].message.content

        def run_remote() -> str:
            return remote.run(remote_name, picture, remote.request(Task.CAPTION, overrides=overrides)).text

        ways = {"direct": run_direct, "v1": run_v1, "remote": run_remote}
        texts = {name: fn() for name, fn in ways.items()}  # warm-up: loads the models, opens connections
        for _ in range(2):
            for fn in ways.values():
                fn()
        if len(set(texts.values())) != 1:
            print(f"warning: the three paths gave different captions: {texts}")
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000)
        print(f"{args.rounds} rounds, {args.tokens} new tokens, image {EXAMPLE.name} "
              f"({EXAMPLE.stat().st_size / 1000:.0f} kB, {picture.size[0]}x{picture.size[1]})")
        print(f"direct          ms: {_summary(times['direct'])}")
        print(f"/v1             ms: {_summary(times['v1'])}")
        print(f"remote          ms: {_summary(times['remote'])}")
        for name in ("v1", "remote"):
            added = [b - a for a, b in zip(times["direct"], times[name])]
            ratio = [b / a for a, b in zip(times["direct"], times[name])]
            print(f"{name:>6} - direct ms: {_summary(added)}")
            print(f"{name:>6} / direct   : {_summary(ratio)}")
        direct.manager.close()
        remote.manager.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
