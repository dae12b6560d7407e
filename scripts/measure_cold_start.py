"""Cold start: seconds for the first /caption of a freshly started app.py, 10 s after it answers HTTP.

    python scripts/measure_cold_start.py ROUNDS MODEL_DIR APP_DIR_A APP_DIR_B

Starts each app (two checkouts, e.g. main and a branch) in turn, A B A B, waits until it serves, waits
10 s (someone opens the page and picks a photo), times one greedy 3-token /caption of the tiny checkpoint
MODEL_DIR, stops it; prints every time and the paired ratios B/A (median, min, max).
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
from gradio_client import Client, handle_file


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_caption(app_dir: str, model: str, photo: str) -> float:
    """Seconds of the first /caption on a new app.py process from ``app_dir``."""
    port = _port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": app_dir}
    process = subprocess.Popen([sys.executable, "app.py", "--model", model, "--offline", "--trust-model", "none",
                                "--port", str(port), "--rate-limit", "0"], cwd=app_dir, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        time.sleep(10)
        client = Client(url, verbose=False)
        started = time.monotonic()
        client.predict(handle_file(photo), model, "fast", 3, 1, api_name="/caption")
        return time.monotonic() - started
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    rounds, model, dirs = int(sys.argv[1]), sys.argv[2], sys.argv[3:5]
    photo = os.path.join(dirs[0], "assets", "examples", "chelsea.jpg")
    times: dict[int, list[float]] = {0: [], 1: []}
    for number in range(rounds):
        for index in (0, 1):
            times[index].append(first_caption(dirs[index], model, photo))
            print(f"round {number} {'AB'[index]} {times[index][-1]:.2f} s", flush=True)
    ratios = [b / a for a, b in zip(times[0], times[1])]
    print("A", [round(t, 2) for t in times[0]], "B", [round(t, 2) for t in times[1]])
    print(f"B/A median {statistics.median(ratios):.2f} min {min(ratios):.2f} max {max(ratios):.2f}")


if __name__ == "__main__":
    main()
