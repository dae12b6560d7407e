"""Batch captioning: files, folders and zip archives (safely), results per image, the caption command."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import threading
import zipfile

import pytest
from PIL import Image

from blip_app import __main__ as cli
from blip_app.cli import commands as cli_commands
from blip_app.core.devices import LoadOptions
from blip_app.core.settings import SETTING_NAMES, Task, resolve_settings
from blip_app.errors import BadImageError, BadInputError, SettingsError
from blip_app.tasks.batch import BatchItem, ZipLimits, caption_many, iter_images
from blip_app.tasks.exports import BATCH_COLUMNS
from blip_app.tasks.service import Service

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "b" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "red.png").write_bytes(png("red"))
    (root / "b" / "Green.PNG").write_bytes(png("green"))
    (root / "b" / "deeper" / "blue.png").write_bytes(png("blue"))
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0")
    (root / ".hidden" / "red.png").write_bytes(png("red"))
    return root


def make_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_folders_are_walked_recursively_sorted_images_only(folder):
    items = list(iter_images([folder]))
    assert [os.path.relpath(i.name, folder) for i in items] == ["b/Green.PNG", "b/deeper/blue.png", "red.png"]
    assert items[2].load().getpixel((0, 0)) == COLOURS["red"]
    assert not any(i.skipped for i in items)


def test_zip_members_are_read_in_memory_and_non_images_noted(tmp_path):
    archive = make_zip(tmp_path / "set.zip", {
        "z/blue.png": png("blue"), "a.png": png("red"), "readme.md": b"# hi", "inner.zip": b"PK",
        "__MACOSX/._a.png": b"junk", "dir/": b"", ".DS_Store": b"",
    })
    items = list(iter_images([str(archive)]))
    names = [i.name.split("set.zip/")[1] for i in items]
    assert names == ["a.png", "inner.zip", "readme.md", "z/blue.png"]
    assert [i.note for i in items if i.skipped] == ["skipped: archives inside archives are not opened",
                                                    "skipped: not an image (.md)"]
    assert items[3].load().getpixel((1, 1)) == COLOURS["blue"]
    assert not list(tmp_path.glob("*.png"))  # nothing was extracted


@pytest.mark.parametrize("evil", ["../evil.png", "/etc/evil.png", "a/../../evil.png", "C:/evil.png",
                                  "..\\..\\evil.png"])
def test_zip_with_a_path_outside_its_folder_is_refused(tmp_path, evil):
    archive = make_zip(tmp_path / "evil.zip", {"fine.png": png("red"), evil: png("blue")})
    with pytest.raises(BadInputError, match="points outside the archive's folder"):
        list(iter_images([archive]))


def test_zip_limits_on_members_and_unpacked_size(tmp_path):
    many = make_zip(tmp_path / "many.zip", {f"{i}.png": b"x" for i in range(11)})
    with pytest.raises(BadInputError, match="holds 11 entries; archives of at most 10"):
        list(iter_images([many], zip_limits=ZipLimits(max_members=10)))
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.png": bytes(3_000_000)})
    assert bomb.stat().st_size < 10_000
    with pytest.raises(BadInputError, match="unpacks to 3 MB"):
        list(iter_images([bomb], zip_limits=ZipLimits(max_total_bytes=2_000_000)))
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="not a readable zip archive"):
        list(iter_images([tmp_path / "fake.zip"]))
    with pytest.raises(BadInputError, match="No such file or folder: .*missing"):
        list(iter_images([tmp_path / "missing"]))


@pytest.fixture()
def service(tiny_checkpoints):
    return Service([str(tiny_checkpoints["blip2-opt"])], LoadOptions())


def test_caption_many_reports_each_image_in_order(service, folder, tmp_path):
    model = service.manager.names[0]
    archive = make_zip(tmp_path / "more.zip", {"green.png": png("green"), "broken.png": b"\x89PNG\r\n\x1a\n junk",
                                               "list.csv": b"a,b"})
    items = list(iter_images([folder, archive]))
    seen = []
    results = list(caption_many(service, model, items, "fast", {"max_new_tokens": 6},
                                progress=lambda done, total, name: seen.append((done, total, name))))
    assert [r.name for r in results] == [i.name for i in items]
    assert [r.index for r in results] == list(range(len(items)))
    assert seen == [(n + 1, len(items), item.name) for n, item in enumerate(items)]
    expected = resolve_settings(Task.CAPTION, "fast", {"max_new_tokens": 6})
    good = [r for r in results if r.ok]
    assert len(good) == 4 and all(isinstance(r.caption, str) and r.seconds > 0 for r in good)
    assert all(r.settings == expected and r.model == model for r in results)
    broken = next(r for r in results if r.name.endswith("broken.png"))
    assert not broken.ok and not broken.skipped and "broken.png" not in (broken.caption or "")
    assert "not a readable image" in broken.error or "truncated" in broken.error
    skipped = next(r for r in results if r.name.endswith("list.csv"))
    assert skipped.skipped and skipped.error == "skipped: not an image (.csv)"
    # captions served together in a batch are the ones each image gets alone
    red = next(r for r in results if r.name.endswith("red.png"))
    alone = service.caption(model, Image.open(folder / "red.png"), preset="fast", overrides={"max_new_tokens": 6})
    assert red.caption == alone.text


def test_bad_settings_fail_before_any_model_loads(service, folder):
    with pytest.raises(SettingsError, match="num_beams is 99"):
        list(caption_many(service, service.manager.names[0], iter_images([folder]), "standard", {"num_beams": 99}))
    assert service.manager.loaded_names() == []


def test_stopping_early_leaves_nothing_running(service, folder):
    model = service.manager.names[0]
    cancel = threading.Event()
    batch = caption_many(service, model, list(iter_images([folder])) * 3, "fast", workers=2, cancel=cancel)
    first = next(batch)
    batch.close()
    assert first.ok and cancel.is_set()
    assert [t for t in threading.enumerate() if t.name.startswith("caption")] == []
    with service.manager.use(model):  # the batch's hold on the model was released
        assert service.manager._users[model] == 1


def test_an_item_that_cannot_load_does_not_stop_the_batch(service):
    def explode():
        raise RuntimeError("disk on fire")

    items = [BatchItem("a", explode), BatchItem("b", lambda: Image.new("RGB", (20, 20), "white"))]
    results = list(caption_many(service, service.manager.names[0], items, "fast"))
    assert not results[0].ok and "Something went wrong" in results[0].error and results[1].ok


def caption_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    caption = commands.add_parser("caption")
    caption.add_argument("images", nargs="+")
    caption.add_argument("--json", action="store_true")
    caption.add_argument("--detailed", action="store_true")
    cli._add_model_options(caption)
    cli_commands.add_caption_batch_options(caption)
    return parser.parse_args(["caption", *argv])


def test_caption_command_takes_folders_and_zips_and_writes_csv_and_jsonl(tiny_checkpoints, folder, tmp_path):
    model = str(tiny_checkpoints["blip2-flan-t5"])
    archive = make_zip(tmp_path / "set.zip", {"one.png": png("green"), "notes.txt": b"x"})
    out, err = io.StringIO(), io.StringIO()
    args = caption_args(str(folder), str(archive), "--model", model, "--preset", "fast", "--max-new-tokens", "5",
                        "--csv", str(tmp_path / "out.csv"), "--jsonl", str(tmp_path / "out.jsonl"))
    assert cli_commands.cmd_caption(args, out, err) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith(os.path.join(str(folder), "b", "Green.PNG") + ": ")
    assert err.getvalue() == f"note: {archive}/notes.txt: skipped: not an image (.txt)\n"
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == BATCH_COLUMNS and len(rows) == 5
    assert all(row["model"] == model and row["max_new_tokens"] == "5" and row["num_beams"] == "1" for row in rows)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == [r["file"] for r in rows]
    assert all(set(SETTING_NAMES) <= set(r) for r in records)


def test_caption_command_single_image_and_failures(tiny_checkpoints, folder, tmp_path):
    model = str(tiny_checkpoints["blip2-opt"])
    out = io.StringIO()
    assert cli_commands.cmd_caption(caption_args(str(folder / "red.png"), "--model", model, "--preset", "fast",
                                              "--json"), out, io.StringIO()) == 0
    assert set(json.loads(out.getvalue())) == {"image", "model", "caption"}
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n junk")
    with pytest.raises(BadImageError):  # named on the command line: fails before a model loads
        cli_commands.cmd_caption(caption_args(str(tmp_path / "corrupt.png"), "--model", model), io.StringIO())
    (folder / "b" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n junk")
    out, err = io.StringIO(), io.StringIO()
    assert cli_commands.cmd_caption(caption_args(str(folder), "--model", model, "--preset", "fast"), out, err) == 1
    assert len(out.getvalue().splitlines()) == 3
    assert err.getvalue().startswith("warning: ") and "error: 1 of 4 images could not be captioned" in err.getvalue()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="No images were found"):
        cli_commands.cmd_caption(caption_args(str(empty), "--model", model), io.StringIO())
