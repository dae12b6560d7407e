"""How the package is laid out: lines per folder (layer), the longest functions, and the files one chat
turn enters. For issue 12's before/after figures; run from the repository root:
    .venv/bin/python scripts/layout_report.py [--trace]      (--trace loads a tiny checkpoint)
"""

from __future__ import annotations

import argparse
import ast
import collections
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "blip_app"


def code_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def layers() -> dict[str, int]:
    totals: dict[str, int] = collections.Counter()
    for path in sorted(PACKAGE.rglob("*.py")):
        folder = path.parent.relative_to(PACKAGE).as_posix()
        totals["(package root)" if folder == "." else folder] += code_lines(path)
    return dict(totals)


def longest_functions(count: int = 15) -> list[tuple[int, str]]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1,
                              f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)[:count]


def chat_turn_files() -> tuple[list[str], int]:
    """The blip_app files whose code runs during one chat turn through the page's handler."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from PIL import Image

    from blip_app.config import AppConfig
    from blip_app.core.images import image_digest, load_image
    from blip_app.devtools.tiny import make_tiny_checkpoint
    from blip_app.tasks.service import Service
    from blip_app.web.page import Tabs
    from blip_app.web.ratelimit import RateLimiter

    folder = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "opt", "blip2-opt")
    from gradio.utils import get_upload_folder

    photo = Path(get_upload_folder()) / "layout-report" / "photo.png"  # where gradio keeps uploads
    photo.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "red").save(photo)
    service = Service([str(folder)])
    service.load(str(folder))
    handlers = Tabs.create(service, AppConfig(), RateLimiter(0))
    uploaded = {"path": str(photo), "meta": {"_type": "gradio.FileData"}}
    chat = {"image": image_digest(load_image(str(photo))), "turns": [["what is it?", "a cat"]]}

    class Session:
        session_hash = "layout-report"

    entered: collections.Counter[str] = collections.Counter()

    def tracer(frame, event, arg):
        if event == "call":
            name = frame.f_code.co_filename
            if name.startswith(str(PACKAGE)):
                entered[Path(name).relative_to(ROOT).as_posix()] += 1
        return None

    sys.setprofile(None)
    import threading

    threading.setprofile(lambda *a: sys.setprofile(tracer))
    sys.setprofile(tracer)
    try:
        list(handlers.chat.chat_send("and the colour?", chat, uploaded, str(folder), Session(), lambda *a, **k: None,
                                preset="fast", max_new_tokens=4))
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return sorted(entered), sum(entered.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", action="store_true", help="also trace one chat turn (loads a tiny checkpoint)")
    args = parser.parse_args()
    print("lines of code (non-blank) per folder:")
    for folder, lines in sorted(layers().items()):
        print(f"  {folder:20} {lines:6,}")
    print("15 longest functions:")
    for lines, where in longest_functions():
        print(f"  {lines:4}  {where}")
    if args.trace:
        files, calls = chat_turn_files()
        print(f"one chat turn enters {len(files)} files ({calls:,} calls of blip_app functions):")
        for name in files:
            print(f"  {name}")


if __name__ == "__main__":
    main()
