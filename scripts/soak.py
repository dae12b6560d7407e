"""Soak test: the real app under mixed load for a long time, with its memory, threads and open files sampled.

    .venv/bin/python scripts/soak.py --minutes 30 [--clients 8] [--out soak.json]

Builds tiny offline checkpoints, starts ``app.py`` in a subprocess on loopback (so that its resident
memory, thread count and open file descriptors can be sampled with psutil), and runs ``--clients``
gradio_client users that loop over captions, questions and chats on three models (a memory budget
that holds two of them, so the third evicts one now and then), hostile requests (broken, disguised
and oversized images, empty and oversized messages, bad settings, unknown models: each must be
refused with its sentence), and requests cancelled mid-generation. Every ``--sample-every`` seconds it
records the server's RSS, threads and open fds.

``--attackers`` more threads (default 2) mix in the attacks of issue 15 with raw HTTP: request bodies
over the cap (36 MB announced: 413 before it is read), refused 1.2 MB /chat calls each in a new
session (sessions expire), uploads cut off mid-body (partial files swept), /search of an archive of
1,999 text files (refused by the per-run cap) and of a dozen photos (decoded one at a time), lone
surrogates and unknown queue events (their own sentences).

Prints and writes a JSON summary: requests served by kind, refusals and errors by kind (an
"unexpected" error is any failure that is not the expected refusal), latency percentiles, and memory,
threads, fds and disk (the server's upload folder, its partial uploads and download folders) at the
start (models loaded), at the end (after two quiet minutes) and at their maximum. Exits 1 if any
unexpected error happened or the server died.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAMILIES = ("blip2-opt", "instructblip-flan-t5", "blip2-flan-t5")
WEIGHTS = (0.45, 0.45, 0.10)  # the third model is the occasional switch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default 30)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent users (default 8)")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--settle", type=float, default=120.0,
                        help="quiet seconds before the final sample (default 120: anyio prunes idle threads, "
                             "idle sessions and partial uploads go after a minute)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "artifacts" / "soak.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attackers", type=int, default=2, help="threads sending issue 15's attacks (default 2)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Inputs


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _zip_of_text_files(members: int) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for number in range(members):
            zf.writestr(f"note-{number:04d}.txt", "not a photo")
    return buffer.getvalue()


def make_inputs(folder: Path) -> dict[str, Any]:
    """Good pictures and hostile files, with the start of the sentence each hostile one must get."""
    import numpy as np
    from PIL import Image

    good = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        path = folder / f"good-{seed}.png"
        Image.fromarray(rng.integers(0, 256, (64 + 16 * seed, 64, 3), dtype=np.uint8)).save(path)
        good.append(path)
    row = b"\x00" * (1 + 20000 // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(20000)) + compressor.flush()
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b""))
    import io

    pdf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(pdf, "PDF")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    hostile = {
        "bomb.png": (bomb, "The image has 400000000 pixels"),
        "report.png": (pdf.getvalue(), "This file is a PDF document, not an image."),
        "empty.jpg": (b"", "The file is empty."),
        "noise.jpg": (os.urandom(4096), "This file is not a readable image."),
        "cut.jpg": (jpeg.getvalue()[:1200], "This JPEG file is truncated or corrupt"),
        "photo.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
                       "HEIC images are not supported"),
    }
    files = {}
    for name, (data, sentence) in hostile.items():
        path = folder / name
        path.write_bytes(data)
        files[name] = (path, sentence)
    return {"good": good, "hostile": files}


# --------------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(models: list[str], budget_gb: float, log_path: Path, temp_dir: Path,
                 trust_model: str | None = None) -> tuple[subprocess.Popen, str]:
    from blip_app.config import build_parser

    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port), "--offline",
               "--rate-limit", "0", "--memory-budget-gb", f"{budget_gb:.9f}", "--time-limit", "60"]
    for model in models:
        command += ["--model", model]
    if "--trust-model" in build_parser()._option_string_actions:
        command += ["--trust-model", trust_model or "none"]  # offline: the tiny matching model, for /search
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "GRADIO_TEMP_DIR": str(temp_dir)}
    log = log_path.open("w")
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see {log_path}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server did not answer within 180 s; see {log_path}")


def _folder_mb(folder: Path) -> float:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return round(total / 2**20, 2)


def sample(pid: int, temp_dir: Path | None = None) -> dict[str, float]:
    """The server's memory, threads and open files, and the disk its temporary files take."""
    import psutil

    process = psutil.Process(pid)
    with process.oneshot():
        values: dict[str, float] = {"t": round(time.time(), 1), "rss_mb": round(process.memory_info().rss / 2**20, 1),
                                    "threads": process.num_threads(), "fds": process.num_fds()}
    if temp_dir is not None:
        values["uploads_mb"] = _folder_mb(temp_dir)
        values["partial_uploads"] = sum(1 for p in temp_dir.glob("tmp*") if p.is_file()) if temp_dir.is_dir() else 0
        downloads = list(Path(tempfile.gettempdir()).glob("blip_app-downloads-*"))
        values["downloads_mb"] = round(sum(_folder_mb(folder) for folder in downloads), 2)
    return values


# --------------------------------------------------------------------------------------------------
# The users


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # expected refusals, by kind
        self.unexpected: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.latency: dict[str, list[float]] = defaultdict(list)

    def ok(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.served[kind] += 1
            self.latency[kind].append(seconds)

    def refusal(self, kind: str) -> None:
        with self.lock:
            self.refused[kind] += 1

    def error(self, kind: str, text: str) -> None:
        with self.lock:
            self.unexpected[kind] += 1
            if len(self.examples[kind]) < 5:
                self.examples[kind].append(text[:300])


def user(index: int, url: str, models: list[str], inputs: dict[str, Any], stop_at: float, tally: Tally,
         seed: int) -> None:
    from gradio_client import Client, handle_file

    rng = random.Random(seed * 1000 + index)
    client = Client(url, verbose=False, download_files=False)
    history: list[list[str]] = []
    own = handle_file(str(inputs["good"][index % len(inputs["good"])]))
    actions = ["caption", "answer", "chat", "hostile", "cancel", "models"]
    weights = [25, 25, 30, 10, 5, 5]
    try:
        while time.monotonic() < stop_at:
            kind = rng.choices(actions, weights)[0]
            model = rng.choices(models, WEIGHTS)[0]
            started = time.monotonic()
            try:
                if kind == "caption":
                    preset = rng.choice(["fast", "standard"])
                    client.predict(handle_file(str(rng.choice(inputs["good"]))), model, preset, max_new_tokens=12,
                                   api_name="/caption")
                elif kind == "answer":
                    client.predict(own, rng.choice(["What is it?", "What colour?", "Is it big?"]), model, "fast",
                                   max_new_tokens=8, api_name="/answer")
                elif kind == "chat":
                    answer = client.predict(own, history, f"Question {len(history)} from user {index}?", models[0],
                                            "fast", max_new_tokens=10, api_name="/chat")
                    history = history + [[f"Question {len(history)} from user {index}?", answer]]
                    if len(history) >= 8:
                        history = []
                elif kind == "models":
                    client.predict(api_name="/models")
                elif kind == "cancel":
                    job = client.submit(own, [], "Tell me everything.", models[0], "fast", max_new_tokens=60,
                                        min_new_tokens=60, api_name="/chat")
                    time.sleep(rng.uniform(0.05, 0.5))
                    job.cancel()
                else:
                    hostile(client, rng, own, model, inputs, tally)
                    continue
                tally.ok(kind, time.monotonic() - started)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                tally.error(kind, f"{type(exc).__name__}: {exc}")
    finally:
        client.close()


def hostile(client: Any, rng: random.Random, own: Any, model: str, inputs: dict[str, Any], tally: Tally) -> None:
    """One hostile request; the refusal must carry its own sentence."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    case = rng.choice(["image", "image", "empty", "huge", "setting", "model"])
    if case == "image":
        name = rng.choice(sorted(inputs["hostile"]))
        path, sentence = inputs["hostile"][name]
        kind, args, kwargs = f"hostile image {name}", (handle_file(str(path)), model, "fast"), {"api_name": "/caption"}
    elif case == "empty":
        kind, args, kwargs, sentence = "empty question", (own, "  \x00 ", model), {"api_name": "/answer"}, "is empty"
    elif case == "huge":
        kind, args, kwargs = "oversized message", (own, [], "x" * 2_000_000, model), {"api_name": "/chat"}
        sentence = "characters long; the limit is"
    elif case == "setting":
        kind, args, kwargs = "out-of-range setting", (own, model, "fast"), {"num_beams": 99, "api_name": "/caption"}
        sentence = "num_beams"
    else:
        kind, args, kwargs = "unknown model", (own, "<b>no-such-model</b>"), {"api_name": "/caption"}
        sentence = "'<b>no-such-model</b>' is not offered"  # the name is quoted as plain text
    try:
        client.predict(*args, **kwargs)
    except AppError as exc:
        if sentence in str(exc) and "Traceback" not in str(exc):
            tally.refusal(kind)
        else:
            tally.error(kind, f"wrong sentence: {exc}")
    except Exception as exc:  # noqa: BLE001
        tally.error(kind, f"{type(exc).__name__}: {exc}")
    else:
        tally.error(kind, "accepted a hostile request")


# --------------------------------------------------------------------------------------------------
# Issue 15's attacks, over raw HTTP


def attacker(index: int, url: str, models: list[str], inputs: dict[str, Any], stop_at: float, tally: Tally,
             seed: int) -> None:
    """Loops over the attacks; each must be refused with its own status and sentence, or served bounded."""
    import httpx

    rng = random.Random(seed * 7919 + index)
    attacks = {"body over the cap": _big_body, "refused chat in a new session": _refused_chat,
               "aborted upload": _aborted_upload, "archive of text files": _text_archive,
               "search of photos": _photo_search, "lone surrogate": _surrogate, "unknown event": _unknown_event}
    with httpx.Client(base_url=url, timeout=120) as http:
        uploaded = http.post("gradio_api/upload", files={"files": ("own.png", inputs["good"][0].read_bytes(),
                                                                   "image/png")}).json()[0]
        file = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
        while time.monotonic() < stop_at:
            kind = rng.choice(sorted(attacks))
            started = time.monotonic()
            try:
                problem = attacks[kind](http, url, file, models, inputs)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                tally.error(f"attack: {kind}", problem)
            else:
                tally.refusal(f"attack: {kind}")
                tally.ok(f"attack: {kind}", time.monotonic() - started)
            time.sleep(rng.uniform(0.2, 1.0))


def _call(http: Any, api: str, data: list[Any]) -> str:
    body = json.dumps({"data": data})  # escapes a lone surrogate as \udXXX, as a raw client would send it
    reply = http.post(f"gradio_api/call/{api}", content=body, headers={"content-type": "application/json"})
    reply.raise_for_status()
    return http.get(f"gradio_api/call/{api}/{reply.json()['event_id']}").text


def _big_body(http: Any, url: str, file: Any, models: list[str], inputs: dict[str, Any]) -> str | None:
    host, port = url.split("//")[1].strip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /gradio_api/call/chat HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {36 * 2**20}\r\n\r\n".encode() + b'{"data": [' + b" " * 4096)
        answer = sock.recv(4096).decode(errors="replace")
    return None if " 413 " in answer.split("\r\n", 1)[0] else f"not refused with 413: {answer[:200]}"


def _refused_chat(http: Any, url: str, file: Any, models: list[str], inputs: dict[str, Any]) -> str | None:
    history = [["q" * 1000, "a" * 1000]] * 600  # 1.2 MB
    text = _call(http, "chat", [file, history, "", models[0], "fast", *[None] * 8])
    return None if "message is empty" in text else f"wrong answer: {text[:200]}"


def _aborted_upload(http: Any, url: str, file: Any, models: list[str], inputs: dict[str, Any]) -> str | None:
    host, port = url.split("//")[1].strip("/").split(":")
    boundary = "soakboundary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                     f"boundary={boundary}\r\nContent-Length: {19 * 2**20}\r\n\r\n".encode() + part
                     + os.urandom(2**20))
        time.sleep(0.2)
    return None


def _text_archive(http: Any, url: str, file: Any, models: list[str], inputs: dict[str, Any]) -> str | None:
    uploaded = http.post("gradio_api/upload", files={"files": ("notes.zip", inputs["text_zip"],
                                                               "application/zip")}).json()[0]
    text = _call(http, "search", [[{"path": uploaded, "meta": {"_type": "gradio.FileData"}}], "a cat",
                                  inputs["trust_model"]])
    return None if "More than 100 files were given" in text else f"wrong answer: {text[:200]}"


def _photo_search(http: Any, url: str, file: Any, models: list[str], inputs: dict[str, Any]) -> str | None:
    records = []
    for path in inputs["good"] * 2:
        uploaded = http.post("gradio_api/upload", files={"files": (path.name, path.read_bytes(), "image/png")})
        records.append({"path": uploaded.json()[0], "meta": {"_type": "gradio.FileData"}})
    text = _call(http, "search", [records, "a noisy picture", inputs["trust_model"]])
    return None if "event: complete" in text and '"score"' in text else f"search failed: {text[:200]}"


def _surrogate(http: Any, url: str, file: Any, models: list[str], inputs: dict[str, Any]) -> str | None:
    text = _call(http, "answer", [file, "What is \ud800 this?", models[0], "fast", *[None] * 8, False])
    return None if "broken character" in text else f"wrong answer: {text[:200]}"


def _unknown_event(http: Any, url: str, file: Any, models: list[str], inputs: dict[str, Any]) -> str | None:
    reply = http.post("gradio_api/queue/join", json={"data": [], "fn_index": 99999, "session_hash": "soak"})
    return None if reply.status_code == 404 and "no event" in reply.text else f"{reply.status_code}: {reply.text[:200]}"


# --------------------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"p50_s": round(statistics.median(ordered), 3), "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
            "max_s": round(ordered[-1], 3)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from blip_app.devtools.tiny import make_tiny_checkpoints, make_tiny_retrieval_checkpoint

    work = Path(tempfile.mkdtemp(prefix="blip-soak-"))
    checkpoints = make_tiny_checkpoints(work / "tiny")
    trust_model = str(make_tiny_retrieval_checkpoint(work / "tiny" / "retrieval"))
    models = [str(checkpoints[family]) for family in FAMILIES]
    sizes = sorted(sum(p.stat().st_size for p in Path(m).glob("*.safetensors")) for m in models)
    budget_gb = (sizes[-1] + sizes[-2]) / 2 * 1.05 / 1024**3  # bfloat16: about half the float32 files; two fit
    inputs = make_inputs(work)
    inputs["trust_model"] = trust_model
    inputs["text_zip"] = _zip_of_text_files(1999)
    log_path = work / "server.log"
    temp_dir = work / "gradio"
    server, url = start_server(models, budget_gb, log_path, temp_dir, trust_model)
    print(f"server pid {server.pid} on {url}; log {log_path}", flush=True)
    samples: list[dict[str, float]] = [{**sample(server.pid, temp_dir), "phase": "started"}]
    tally = Tally()
    try:
        from gradio_client import Client, handle_file

        warm = Client(url, verbose=False, download_files=False)
        for model in models[:2]:
            warm.predict(handle_file(str(inputs["good"][0])), model, "fast", max_new_tokens=4, api_name="/caption")
        warm.close()
        samples.append({**sample(server.pid, temp_dir), "phase": "warm"})
        started = time.monotonic()
        stop_at = started + args.minutes * 60
        workers = [threading.Thread(target=user, args=(i, url, models, inputs, stop_at, tally, args.seed), daemon=True)
                   for i in range(args.clients)]
        workers += [threading.Thread(target=attacker, args=(i, url, models, inputs, stop_at, tally, args.seed),
                                     daemon=True) for i in range(args.attackers)]
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers):
            time.sleep(min(args.sample_every, max(0.1, stop_at + 120 - time.monotonic())))
            if server.poll() is not None:
                break
            samples.append({**sample(server.pid, temp_dir), "phase": "load"})
            done = sum(tally.served.values())
            print(f"{(time.monotonic() - started) / 60:5.1f} min  served {done}  "
                  f"unexpected {sum(tally.unexpected.values())}  {samples[-1]}", flush=True)
            if time.monotonic() > stop_at + 120:
                break
        alive = server.poll() is None
        if alive:
            time.sleep(args.settle)
            samples.append({**sample(server.pid, temp_dir), "phase": "settled"})
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    log_text = log_path.read_text(errors="replace")
    load = [s for s in samples if s["phase"] in ("warm", "load", "settled")]
    start, end = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    summary = {
        "minutes": args.minutes,
        "clients": args.clients,
        "models": [Path(m).name for m in models],
        "requests_served": dict(sorted(tally.served.items())),
        "requests_served_total": sum(tally.served.values()),
        "refused_as_expected": dict(sorted(tally.refused.items())),
        "unexpected_errors": dict(sorted(tally.unexpected.items())),
        "unexpected_examples": dict(tally.examples),
        "latency": {kind: percentiles(values) for kind, values in sorted(tally.latency.items())},
        "server_alive_at_end": alive,
        "server_tracebacks_logged": log_text.count("Traceback (most recent call last)"),
        "model_loads_logged": len(re.findall(r"Loaded .+ in [0-9.]+ s", log_text)),
        "memory_mb": {"start": start["rss_mb"], "end": end["rss_mb"], "max": max(s["rss_mb"] for s in load)},
        "threads": {"start": start["threads"], "end": end["threads"], "max": max(s["threads"] for s in load)},
        "fds": {"start": start["fds"], "end": end["fds"], "max": max(s["fds"] for s in load)},
        "disk_mb": {key: {"start": start.get(key), "end": end.get(key), "max": max(s.get(key, 0) for s in load)}
                    for key in ("uploads_mb", "downloads_mb", "partial_uploads")},
        "attackers": args.attackers,
        "samples": samples,
        "server_log": str(log_path),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    printed = {k: v for k, v in summary.items() if k != "samples"}
    print(json.dumps(printed, indent=2))
    print(f"summary written to {args.out}")
    return 0 if alive and not tally.unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
