"""Conversation export / import with the reproducibility card, and batch results as CSV and JSON Lines."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image

from blip_app import __version__
from blip_app.core.catalog import LanguageModel
from blip_app.core.devices import LoadOptions, plan_load
from blip_app.core.images import image_digest
from blip_app.core.prompts import Turn
from blip_app.core.settings import SETTING_NAMES, GenerationSettings, Task, resolve_settings
from blip_app.errors import BadInputError
from blip_app.models.hardware import detect_hardware
from blip_app.tasks.batch import BatchResult
from blip_app.tasks.exports import (
    BATCH_COLUMNS,
    FORMAT,
    batch_to_csv,
    batch_to_jsonl,
    card_for,
    conversation_from_json,
    conversation_to_json,
    conversation_to_markdown,
    export_filename,
    reproducibility_card,
    save_text,
)
from blip_app.tasks.service import Service

RED = Image.new("RGB", (40, 30), "red")
SETTINGS = GenerationSettings(max_new_tokens=40, num_beams=1, do_sample=True, temperature=0.7, top_p=0.8, seed=7)
HISTORY = [("What colour is it?", "red"), ("Is it | a <b>square</b>?", "yes, # it is\n- really")]


def card(**changes):
    values = dict(model="blip2-opt-2.7b", source="Salesforce/blip2-opt-2.7b", settings=SETTINGS,
                  image_sha256=image_digest(RED), revision="abc123", precision="bfloat16", device="cpu")
    values.update(changes)
    return reproducibility_card(**values)


def export(**changes) -> dict:
    return json.loads(conversation_to_json(HISTORY, card(**changes), trust=[0.91, None]))


def test_export_then_import_gives_the_same_conversation():
    text = conversation_to_json([Turn(*pair) for pair in HISTORY], card(), trust=[0.91, None])
    imported = conversation_from_json(text)
    assert imported.history == tuple(HISTORY)
    assert imported.turns == tuple(Turn(*pair) for pair in HISTORY)
    assert imported.model == "blip2-opt-2.7b"
    assert imported.settings == SETTINGS.as_dict()
    assert resolve_settings(Task.CHAT, "standard", imported.settings) == SETTINGS
    assert imported.image_sha256 == image_digest(RED) and imported.trust == (0.91, None)
    assert imported.matches_image(RED.copy()) and not imported.matches_image(Image.new("RGB", (40, 30), "blue"))
    assert imported.card == card() | {"created": imported.card["created"], "versions": imported.card["versions"]}


def test_the_card_records_everything_needed_to_redo_it():
    data = export()
    assert data["format"] == FORMAT and data["version"] == 1
    info = data["card"]
    assert info["seed"] == 7 and set(info["settings"]) == set(SETTING_NAMES)
    assert info["settings"]["temperature"] == 0.7 and info["revision"] == "abc123"
    assert info["versions"] == {"blip_app": __version__, "transformers": metadata.version("transformers"),
                                "torch": metadata.version("torch")}
    assert datetime.fromisoformat(info["created"]).tzinfo is not None


def test_card_for_a_service_model_loads_nothing(tiny_checkpoints):
    path = str(tiny_checkpoints["blip2-opt"])
    service = Service([path], LoadOptions())
    info = card_for(service, path, SETTINGS, RED)
    plan = plan_load(LanguageModel.OPT, LoadOptions(), detect_hardware())
    assert info["model"] == path and info["source"] == str(Path(path).resolve()) and info["revision"] is None
    assert (info["precision"], info["device"]) == (plan.precision_label, "cpu")
    assert info["image_sha256"] == image_digest(RED)
    assert service.manager.loaded_names() == []
    reply = service.chat(path, RED, [], "what is it?", preset="fast")
    info = card_for(service, path, reply.settings, image_sha256="0" * 64)
    assert info["settings"] == reply.settings.as_dict() and info["image_sha256"] == "0" * 64


def test_markdown_shows_card_settings_and_turns_literally():
    text = conversation_to_markdown(HISTORY, card(), trust=[0.91, None])
    assert "| Model | blip2-opt-2.7b (Salesforce/blip2-opt-2.7b) |" in text
    assert f"| Versions | blip\\_app {__version__}, transformers " in text  # _ escaped: renders as blip_app
    assert "| Seed | 7 |" in text and "| Revision | abc123 |" in text and image_digest(RED) in text
    assert '"temperature": 0.7' in text
    assert "**You:** What colour is it?" in text
    assert "_(image match: very likely, 0.91)_" in text
    assert "Is it \\| a \\<b\\>square\\</b\\>?" in text  # no table break, no HTML
    assert "yes, \\# it is  \n\\- really" in text
    assert text.count("**blip2-opt-2.7b:**") == 2


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "it is empty"),
        (b"\xff\xfe{not utf8", "not UTF-8"),
        ("{\"format\": ", "not valid JSON"),
        ("[1, 2]", "not a blip_app conversation export"),
        ('{"hello": "world"}', "not a blip_app conversation export"),
        ('{"format": "blip_app.conversation", "version": 99}', "newer blip_app"),
        ('{"format": "blip_app.conversation", "version": "1"}', "not a version number"),
        ('{"format": "blip_app.conversation", "version": 1, "turns": []}', "card is missing"),
        ("[" * 100_000 + "]" * 100_000, "not a blip_app conversation export|nested too deeply"),
        ('{"format": "blip_app.conversation", "version": 1, "x": NaN}', "does not allow"),
    ],
)
def test_malformed_or_foreign_files_are_refused_by_name(payload, message):
    with pytest.raises(BadInputError, match=message) as caught:
        conversation_from_json(payload)
    assert str(caught.value).startswith("This conversation file cannot be loaded: ")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["card"].pop("model"), "does not name the model"),
        (lambda d: d["card"].__setitem__("settings", {"num_beams": 0}), "num_beams must be at least 1"),
        (lambda d: d["card"]["settings"].__setitem__("evil", 1), "unknown generation settings"),
        (lambda d: d["card"]["settings"].__setitem__("top_p", "0.9"), "not a number"),
        (lambda d: d["card"].__setitem__("image_sha256", "abc"), "not a SHA-256"),
        (lambda d: d.__setitem__("turns", {"q": "a"}), "no list of turns"),
        (lambda d: d["turns"].append("hello"), "turn 3 is not an object"),
        (lambda d: d["turns"][0].__setitem__("question", "   "), "question of turn 1 is empty"),
        (lambda d: d["turns"][1].__setitem__("answer", ["x"]), "answer of turn 2 must be text"),
        (lambda d: d["turns"][0].__setitem__("trust", 1.5), "trust score of turn 1"),
        (lambda d: d["turns"][0].__setitem__("question", "x" * 30_000), "30,000 characters"),
    ],
)
def test_invalid_exports_are_refused_by_name(change, message):
    data = export()
    change(data)
    with pytest.raises(BadInputError, match=message):
        conversation_from_json(json.dumps(data))


def test_oversized_and_overlong_exports_are_refused(tmp_path):
    text = conversation_to_json(HISTORY * 10, card())
    with pytest.raises(BadInputError, match="larger than 1,000 bytes, the most that is accepted"):
        conversation_from_json(text, max_bytes=1000)
    with pytest.raises(BadInputError, match="20 turns; at most 5"):
        conversation_from_json(text, max_turns=5)
    big = tmp_path / "big.json"
    big.write_text(text + " " * 3_000_000)
    with pytest.raises(BadInputError, match=r"it is \d\.\d MB; at most 2\.1 MB is accepted"):
        conversation_from_json(big)


def test_import_reads_paths_strings_bytes_and_streams(tmp_path):
    text = conversation_to_json(HISTORY, card())
    path = save_text(text, "../../conv ersation.json", tmp_path)
    assert path.parent == tmp_path and path.name == "conv_ersation.json"
    for source in (path, str(path), text, text.encode(), io.BytesIO(text.encode("utf-8-sig"))):
        assert conversation_from_json(source).history == tuple(HISTORY)
    assert export_filename("/models/tiny opt", "md").startswith("conversation-tiny_opt-")


def results():
    settings = GenerationSettings(length_penalty=-1.0, max_new_tokens=10)
    return [
        BatchResult(0, "photos/cat.png", "a cat on a mat", "blip2-opt-2.7b", settings, 0.5),
        BatchResult(1, "=cmd|' /C calc'!A0.png", "=HYPERLINK(\"http://x\")", "blip2-opt-2.7b", settings, 0.25),
        BatchResult(2, "+plus.png", "-minus", "@model", settings, 0.125),
        BatchResult(3, "bad.png", None, "blip2-opt-2.7b", settings, None, "bad.png is not a readable image"),
    ]


def test_csv_records_every_setting_and_neutralises_formulas():
    rows = list(csv.DictReader(io.StringIO(batch_to_csv(results()))))
    assert tuple(rows[0]) == BATCH_COLUMNS and len(rows) == 4
    assert rows[0]["caption"] == "a cat on a mat" and rows[0]["model"] == "blip2-opt-2.7b"
    assert rows[0]["max_new_tokens"] == "10" and rows[0]["length_penalty"] == "-1.0"  # numbers stay numbers
    assert rows[0]["seconds"] == "0.5" and rows[0]["seed"] == ""
    assert rows[1]["file"].startswith("'=") and rows[1]["caption"] == "'=HYPERLINK(\"http://x\")"
    assert rows[2]["file"] == "'+plus.png" and rows[2]["caption"] == "'-minus" and rows[2]["model"] == "'@model"
    assert rows[3]["caption"] == "" and rows[3]["error"] == "bad.png is not a readable image"
    for row in rows:
        assert not any(str(v).startswith(("=", "+", "@")) for v in row.values())


def test_json_lines_keep_values_as_they_are():
    lines = [json.loads(line) for line in batch_to_jsonl(results()).splitlines()]
    assert [tuple(line) for line in lines] == [BATCH_COLUMNS] * 4
    assert lines[1]["caption"] == "=HYPERLINK(\"http://x\")" and lines[1]["length_penalty"] == -1.0
    assert lines[3]["caption"] is None and lines[3]["seconds"] is None and "not a readable" in lines[3]["error"]


HOSTILE_NAMES = [
    "holiday\r=2+5\r.png",  # a bare carriage return: the csv module quotes only its own line terminator
    "holiday\n=2+5\n.png",
    "holiday\r\n@SUM(A1)\r\n.png",
    "cat\n\t=1+1.png",
    "\r=3+4.png",
    "\n-5+5.png",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_no_line_of_a_csv_cell_can_start_a_formula(name: str):
    """Issue 15 item 3: spreadsheets and pandas read what follows a line break as a new row or cell."""
    import pandas as pd

    settings = GenerationSettings(max_new_tokens=10)
    rows = [BatchResult(0, name, "a caption\r+1", "blip2-opt-2.7b", settings, 0.5),
            BatchResult(1, "ok.png", "-1 is a caption", "blip2-opt-2.7b", settings, 0.25)]
    text = batch_to_csv(rows)
    table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    assert len(table) == 2 and tuple(table.columns) == BATCH_COLUMNS
    assert table["file"][1] == "ok.png" and table["caption"][1] == "'-1 is a caption"
    read = list(csv.reader(io.StringIO(text, newline="")))
    assert len(read) == 3 and all(len(row) == len(BATCH_COLUMNS) for row in read)
    for cell in [*table.to_numpy().ravel(), *(c for row in read for c in row)]:
        for line in str(cell).replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            assert not line.startswith(("=", "+", "-", "@", "\t")), (name, cell)
    # the text itself is kept, behind the quote marks
    assert table["file"][0].replace("'", "") == name and table["caption"][0] == "a caption\r'+1"
