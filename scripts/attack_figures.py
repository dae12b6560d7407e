"""Before/after figures for issue 15's items 1, 2, 5 and 6: the attacks, against the real server.

    .venv/bin/python scripts/attack_figures.py [--items 1,2,5,6] [--app-dir DIR] [--out figures.json]

Builds tiny offline checkpoints (and the tiny image-text matching model), starts ``DIR/app.py`` in a
subprocess on loopback (``--app-dir`` defaults to this checkout; point it at an older tree, e.g. one
made with ``git archive <commit> | tar -x -C DIR``, for the "before" figures) and measures its resident
memory (sampled every 50 ms) and CPU time with psutil while it is attacked:

1. rounds of 20 refused /chat calls with a 1.2 MB history, each in a new session (a minute apart), then
   one 36 MB request body;
2. the Batch tab (gradio's queue protocol, as the page sends it) on a zip of 1,999 .txt members;
5. 20 simultaneous new images of 40 megapixels through the page's image handler (on_image);
6. /search over 100 photos of 40 megapixels (the most it takes).

Prints one JSON object per item and writes them all to ``--out``. Not run by the tests (minutes, GBs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="1,2,5,6", help="which items to measure (default 1,2,5,6)")
    parser.add_argument("--app-dir", type=Path, default=ROOT, help="the source tree whose app.py is served")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "artifacts" / "attack_figures.json")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the app")
    return parser.parse_args(argv)


class Server:
    """``app.py`` in a subprocess; its memory sampled in the background."""

    def __init__(self, app_dir: Path, python: str, models: list[str], *flags: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.temp = Path(tempfile.mkdtemp(prefix="blip-figures-"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(self.temp / "gradio")}
        command = [python, str(app_dir / "app.py"), "--host", "127.0.0.1", "--port", str(port), "--offline",
                   "--rate-limit", "0", *flags]
        for model in models:
            command += ["--model", model]
        self.log = (self.temp / "server.log").open("w")
        self.process = subprocess.Popen(command, cwd=app_dir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}/"
        self.peak = 0.0
        self._stop = threading.Event()
        self._wait_ready()
        threading.Thread(target=self._watch, daemon=True).start()

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited; see {self.log.name}")
            try:
                if httpx.get(self.url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server did not start; see {self.log.name}")

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.rss_mb())
            except Exception:  # noqa: BLE001 - the process ended
                return

    def rss_mb(self) -> float:
        import psutil

        return round(psutil.Process(self.process.pid).memory_info().rss / 2**20, 1)

    def cpu_s(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return round(times.user + times.system, 2)

    def reset_peak(self) -> None:
        self.peak = self.rss_mb()

    def close(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def upload(http: Any, name: str, data: bytes) -> dict[str, Any]:
    reply = http.post("gradio_api/upload", files={"files": (name, data, "application/octet-stream")})
    reply.raise_for_status()
    return {"path": reply.json()[0], "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def page_event(http: Any, url: str, api_name: str, values: dict[int, Any]) -> tuple[str, float]:
    """Run a page event as the browser does (queue join, then its event stream); its last message and seconds."""
    config = http.get("config").json()
    components = {c["id"]: c for c in config["components"]}
    dependency = next(d for d in config["dependencies"] if d.get("api_name") == api_name)
    data = [values.get(n, (components[i].get("props") or {}).get("value")) for n, i in enumerate(dependency["inputs"])]
    session = uuid.uuid4().hex
    started = time.monotonic()
    joined = http.post("gradio_api/queue/join", json={"data": data, "fn_index": dependency["id"],
                                                      "session_hash": session, "trigger_id": None})
    if joined.status_code != 200:
        return f"join refused: {joined.status_code} {joined.text[:200]}", time.monotonic() - started
    last = ""
    with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}, timeout=600) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                last = line[5:].strip()
                if '"process_completed"' in last:
                    break
    return last, time.monotonic() - started


def big_picture(side: int = 6324) -> bytes:
    """A PNG just under the 40-megapixel limit (a smooth gradient, so the file stays small; decoded, 120 MB)."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.broadcast_to(ramp, (side, side)), np.broadcast_to(ramp[:, None], (side, side)),
                       np.full((side, side), 128, np.float32)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()


def item_1(app_dir: Path, python: str, models: list[str], rounds_of_chats: int = 4) -> dict[str, Any]:
    import httpx

    server = Server(app_dir, python, models[:1], "--trust-model", "none")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            http.post("gradio_api/call/models", json={"data": []})
            time.sleep(2)
            start = server.rss_mb()
            image = upload(http, "cat.png", (ROOT / "assets" / "examples" / "chelsea.jpg").read_bytes())
            history = [["q" * 1000, "a" * 1000]] * 600
            rounds = []
            for round_ in range(rounds_of_chats):
                if round_:
                    time.sleep(75)  # the app forgets sessions no page keeps open after a minute
                for _ in range(20):
                    reply = http.post("gradio_api/call/chat", json={"data": [image, history, "", models[0], "fast",
                                                                             *[None] * 8]})
                    if reply.status_code == 200:
                        http.get(f"gradio_api/call/chat/{reply.json()['event_id']}")
                time.sleep(3)
                rounds.append(server.rss_mb())
            after_chats = rounds[0]
            status = _send_body(server.url, 36 * 2**20)
            time.sleep(1)
            after_body = server.rss_mb()
            time.sleep(10)
            later = server.rss_mb()
            time.sleep(80)  # the app expires idle sessions after a minute
            much_later = server.rss_mb()
        return {"item": 1, "rss_mb_start": start, "after_20_refused_1.2MB_chats": after_chats,
                "after_each_round_of_20_a_minute_apart": rounds,
                "36MB_body_status": status, "after_36MB_body": after_body, "10_s_later": later,
                "90_s_later": much_later, "peak": server.peak}
    finally:
        server.close()


def _send_body(url: str, size: int) -> int:
    host, port = url.split("//")[1].strip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(f"POST /gradio_api/call/chat HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        sent, chunk = 0, b'{"data": ["' + b"x" * (2**20)
        try:
            while sent < size:
                part = chunk[: size - sent]
                sock.sendall(part)
                sent += len(part)
        except OSError:
            pass  # refused before the end
        try:
            answer = sock.recv(4096).decode(errors="replace")
        except OSError:
            return 0
    return int(answer.split(" ", 2)[1]) if answer.startswith("HTTP/") else 0


def item_2(app_dir: Path, python: str, models: list[str], *flags: str) -> dict[str, Any]:
    import httpx

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for number in range(1999):
            zf.writestr(f"note-{number:04d}.txt", "not a photo")
    server = Server(app_dir, python, models[:1], "--trust-model", "none", *flags)
    try:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            archive = upload(http, "notes.zip", buffer.getvalue())
            before = server.cpu_s()
            last, seconds = page_event(http, server.url, "run_batch", {0: [archive], 1: models[0]})
            cpu = round(server.cpu_s() - before, 2)
        return {"item": 2, "flags": list(flags), "zip_kb": round(len(buffer.getvalue()) / 1024), "server_cpu_s": cpu,
                "wall_s": round(seconds, 2), "last_message": last[:160]}
    finally:
        server.close()


def item_5(app_dir: Path, python: str, models: list[str], picture: bytes) -> dict[str, Any]:
    import httpx

    server = Server(app_dir, python, models[:1], "--trust-model", "none")
    try:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            records = [upload(http, f"big-{n}.png", picture) for n in range(20)]
            time.sleep(1)
            start = server.rss_mb()
            server.reset_peak()
            results: list[str] = []
            threads = [threading.Thread(target=lambda r=r: results.append(
                page_event(httpx.Client(base_url=server.url, timeout=600), server.url, "on_image", {0: r})[0]))
                for r in records]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.monotonic() - started
        return {"item": 5, "rss_mb_start": start, "peak": server.peak, "peak_rise_mb": round(server.peak - start, 1),
                "wall_s": round(seconds, 2), "completed": sum('"success":true' in r.replace(" ", "") for r in results)}
    finally:
        server.close()


def item_6(app_dir: Path, python: str, models: list[str], retrieval: str, picture: bytes,
           count: int = 100) -> dict[str, Any]:
    import httpx

    server = Server(app_dir, python, models[:1], "--trust-model", retrieval)
    try:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            records = [upload(http, f"big-{n}.png", picture) for n in range(count)]
            warm = http.post("gradio_api/call/search", json={"data": [records[:1], "a picture", retrieval]})
            http.get(f"gradio_api/call/search/{warm.json()['event_id']}")
            time.sleep(1)
            start = server.rss_mb()
            server.reset_peak()
            started = time.monotonic()
            reply = http.post("gradio_api/call/search", json={"data": [records, "a picture", retrieval]})
            text = http.get(f"gradio_api/call/search/{reply.json()['event_id']}").text
            seconds = time.monotonic() - started
        return {"item": 6, "images": count, "rss_mb_start": start, "peak": server.peak,
                "peak_rise_mb": round(server.peak - start, 1), "wall_s": round(seconds, 2),
                "ranked": text.count('"score"')}
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from blip_app.devtools.tiny import make_tiny_checkpoints, make_tiny_retrieval_checkpoint

    items = {int(n) for n in args.items.split(",") if n.strip()}
    work = Path(tempfile.mkdtemp(prefix="blip-figures-"))
    checkpoints = make_tiny_checkpoints(work / "tiny")
    models = [str(checkpoints["blip2-opt"])]
    retrieval = str(make_tiny_retrieval_checkpoint(work / "tiny" / "retrieval"))
    picture = big_picture() if items & {5, 6} else b""
    figures = []
    app_dir = args.app_dir.resolve()
    for item, run in ((1, lambda: item_1(app_dir, args.python, models)),
                      (2, lambda: item_2(app_dir, args.python, models)),
                      (2, lambda: item_2(app_dir, args.python, models, "--max-batch-images", "2000")),
                      (5, lambda: item_5(app_dir, args.python, models, picture)),
                      (6, lambda: item_6(app_dir, args.python, models, retrieval, picture))):
        if item not in items:
            continue
        try:
            figure = run()
        except SystemExit as exc:  # e.g. an older tree without --max-batch-images
            figure = {"item": item, "skipped": str(exc)}
        figure["app_dir"] = str(app_dir)
        print(json.dumps(figure), flush=True)
        figures.append(figure)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
