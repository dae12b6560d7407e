"""Load and caption times of each tiny family: ``.venv/bin/python scripts/measure_tiny.py``.

Single-threaded, as in the tests. Loading goes through from_pretrained; each caption is a new image
(so the vision encoder runs), 5 beams, 20 new tokens.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from blip_app.core.catalog import resolve  # noqa: E402
from blip_app.core.settings import GenerationSettings, Task  # noqa: E402
from blip_app.devtools.tiny import make_tiny_checkpoints  # noqa: E402
from blip_app.models.engine import LoadedModel  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    paths = make_tiny_checkpoints(tempfile.mkdtemp())
    print(f"build all four: {time.perf_counter() - started:.2f} s")
    settings = GenerationSettings(max_new_tokens=20, num_beams=5)
    for family, path in paths.items():
        loads = []
        for _ in range(3):
            started = time.perf_counter()
            model = LoadedModel.load(resolve(str(path)))
            loads.append(time.perf_counter() - started)
        captions = []
        for index in range(10):
            image = Image.new("RGB", (64, 64), (index * 20, 100, 50))
            started = time.perf_counter()
            model.generate(image, model.prepare(Task.CAPTION), settings)
            captions.append(time.perf_counter() - started)
        print(f"{family:22} load {statistics.median(loads) * 1000:5.0f} ms   "
              f"caption {statistics.median(captions) * 1000:6.1f} ms (median)")


if __name__ == "__main__":
    main()
