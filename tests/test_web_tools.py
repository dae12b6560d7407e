"""Trust scores, search, embeddings, batch captioning, chat export/import and side by side, in the app.

The API is driven over HTTP with gradio_client against the real app on loopback, offering two tiny
captioning checkpoints and a tiny image-text matching checkpoint (built offline like the others); the
page's handlers are called directly on the same Service, as gradio calls them (uploads as file records
in gradio's upload folder, ``preprocess=False``). Tiny models write random text, so texts are checked for
type and bookkeeping, and scores against the retrieval module computing them in-process.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from _server import RunningApp, running_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
PHOTOS = ["chelsea.jpg", "rocket.jpg", "coffee.jpg"]
ENDPOINTS = {"/caption", "/answer", "/chat", "/models", "/trust", "/search", "/embed"}


@pytest.fixture(scope="module")
def tiny_retrieval(tmp_path_factory: pytest.TempPathFactory) -> str:
    from blip_app.devtools.tiny import make_tiny_retrieval_checkpoint

    return str(make_tiny_retrieval_checkpoint(tmp_path_factory.mktemp("retrieval") / "itm"))


@pytest.fixture(scope="module")
def models(tiny_checkpoints: dict[str, Path]) -> list[str]:
    return [str(tiny_checkpoints["blip2-opt"]), str(tiny_checkpoints["instructblip-flan-t5"])]


@pytest.fixture(scope="module")
def app(models: list[str], tiny_retrieval: str) -> RunningApp:
    with running_app(models, "--trust-model", tiny_retrieval) as running:
        yield running


@pytest.fixture(scope="module")
def client(app: RunningApp) -> Client:
    return Client(app.url, verbose=False, download_files=False)


def refused(client: Client, *args, api_name: str, **kwargs) -> str:
    with pytest.raises(AppError) as caught:
        client.predict(*args, api_name=api_name, **kwargs)
    return str(caught.value)


# ------------------------------------------------------------------------------------------------
# Configuration


def test_the_trust_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from blip_app.config import DEFAULT_TRUST_MODEL, parse_config

    monkeypatch.delenv("BLIP_APP_TRUST_MODEL", raising=False)
    monkeypatch.delenv("BLIP_APP_TRUST", raising=False)
    assert DEFAULT_TRUST_MODEL == "blip2-itm-vit-g"
    config = parse_config(["--model", "blip2-opt-2.7b"])
    assert config.trust_model == DEFAULT_TRUST_MODEL and config.trust
    assert config.offered_models == ("blip2-opt-2.7b", DEFAULT_TRUST_MODEL)
    off = parse_config(["--model", "blip2-opt-2.7b", "--trust", "off"])
    assert off.trust_model == DEFAULT_TRUST_MODEL and not off.trust  # search and /trust stay
    none = parse_config(["--model", "blip2-opt-2.7b", "--trust-model", "none"])
    assert none.trust_model is None and not none.trust and none.offered_models == ("blip2-opt-2.7b",)
    monkeypatch.setenv("BLIP_APP_TRUST_MODEL", "Salesforce/blip2-itm-vit-g")
    assert parse_config([]).trust_model == "Salesforce/blip2-itm-vit-g"
    with pytest.raises(SystemExit):
        parse_config(["--model", "blip2-opt-2.7b", "--trust-model", "blip2-opt-2.7b"])


def test_the_picker_leaves_out_the_matching_model_by_catalog_name_or_config() -> None:
    from blip_app.tasks.service import Service
    from blip_app.web.common import captioning_states

    service = Service(["blip2-opt-2.7b", "blip2-itm-vit-g"])  # nothing is loaded or downloaded
    assert [s.name for s in captioning_states(service)] == ["blip2-opt-2.7b"]


# ------------------------------------------------------------------------------------------------
# The API


def test_the_api_adds_trust_search_and_embed(client: Client, tiny_retrieval: str) -> None:
    info = client.view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == ENDPOINTS
    params = {name: [p["parameter_name"] for p in info["named_endpoints"][name]["parameters"]]
              for name in ("/trust", "/search", "/embed")}
    assert params == {"/trust": ["image", "text", "model"], "/search": ["images", "query", "model"],
                      "/embed": ["image", "text", "model", "full"]}
    trust = info["named_endpoints"]["/trust"]["parameters"]
    defaults = {p["parameter_name"]: p.get("parameter_default") for p in trust}
    assert defaults["model"] == tiny_retrieval


def test_models_lists_only_the_captioning_models(client: Client, models: list[str]) -> None:
    assert [entry["name"] for entry in client.predict(api_name="/models")] == models


def test_trust_gives_the_matching_heads_probability(client: Client, app: RunningApp, tiny_retrieval: str) -> None:
    from blip_app.core.images import load_image
    from blip_app.models.retrieval import confidence_label, trust_score

    result = client.predict(handle_file(EXAMPLES / "chelsea.jpg"), "a cat with green eyes", api_name="/trust")
    assert set(result) == {"score", "label", "model"}
    assert 0.0 <= result["score"] <= 1.0 and result["label"] == confidence_label(result["score"])
    direct = trust_score(app.service, tiny_retrieval, load_image(EXAMPLES / "chelsea.jpg"), "a cat with green eyes")
    assert result["score"] == pytest.approx(direct.score, abs=1e-4)


def test_trust_refusals(client: Client, models: list[str]) -> None:
    image = handle_file(EXAMPLES / "chelsea.jpg")
    assert "empty" in refused(client, image, "   ", api_name="/trust")
    assert "captioning model" in refused(client, image, "a cat", models[0], api_name="/trust")
    assert "not offered" in refused(client, image, "a cat", "no-such-model", api_name="/trust")
    assert "uploaded file" in refused(client, {"path": str(EXAMPLES / "chelsea.jpg")}, "a cat", api_name="/trust")


def test_search_ranks_files_and_zips(client: Client, app: RunningApp, tiny_retrieval: str, tmp_path: Path) -> None:
    from blip_app.core.images import load_image
    from blip_app.models.retrieval import search

    hits = client.predict([handle_file(EXAMPLES / name) for name in PHOTOS], "a cat", api_name="/search")
    assert sorted(hit["index"] for hit in hits) == [0, 1, 2]
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    assert {hit["name"] for hit in hits} == set(PHOTOS)
    direct = search(app.service, tiny_retrieval, [load_image(EXAMPLES / n) for n in PHOTOS], "a cat", names=PHOTOS)
    assert [h["name"] for h in hits] == [h.name for h in direct]

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in PHOTOS[:2]:
            zf.write(EXAMPLES / name, f"trip/{name}")
        zf.writestr("trip/readme.txt", "not a photo")
    zipped = client.predict([handle_file(archive)], "a rocket", api_name="/search")
    assert sorted(hit["name"] for hit in zipped) == [f"photos.zip/trip/{name}" for name in sorted(PHOTOS[:2])]
    assert "Add some" in refused(client, [], "a cat", api_name="/search")
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(512))
    assert "bad.png" in refused(client, [handle_file(EXAMPLES / "chelsea.jpg"), handle_file(corrupt)], "a cat",
                                api_name="/search")


def test_embed_images_and_texts(client: Client, models: list[str]) -> None:
    features = client.predict(handle_file(EXAMPLES / "chelsea.jpg"), "a cat", api_name="/embed")
    kinds = {entry["kind"]: entry for entry in features}
    assert set(kinds) == {"image", "qformer", "itc-image", "qformer-text", "itc-text"}
    assert kinds["itc-text"]["input"] == "a cat" and kinds["itc-image"]["input"] == "chelsea.jpg"
    assert kinds["itc-text"]["norm"] == pytest.approx(1.0, abs=1e-2)  # bfloat16 on this CPU
    assert len(kinds["itc-text"]["vector"]) == kinds["itc-text"]["shape"][0]
    assert "rows" not in kinds["itc-image"]
    full = client.predict(None, "a dog", full=True, api_name="/embed")
    assert {e["kind"] for e in full} == {"qformer-text", "itc-text"}
    generative = client.predict(handle_file(EXAMPLES / "chelsea.jpg"), "a cat", models[0], api_name="/embed")
    assert {e["kind"] for e in generative} == {"image", "qformer", "text"}
    assert "image, a text" in refused(client, None, None, api_name="/embed")


def test_without_a_trust_model_there_is_no_trust_search_or_search_tab(models: list[str]) -> None:
    with running_app(models[:1], "--trust-model", "none") as running:
        client = Client(running.url, verbose=False, download_files=False)
        info = client.view_api(return_format="dict", print_info=False)
        assert set(info["named_endpoints"]) == {"/caption", "/answer", "/chat", "/models", "/embed"}
        ids = {getattr(block, "elem_id", None) for block in running.demo.blocks.values()}
        assert "search-run" not in ids and "caption-trust" not in ids
        assert "compare-none" in ids and "compare-run" not in ids  # one model: nothing to compare


def test_trust_off_keeps_search_but_scores_nothing_by_itself(models: list[str], tiny_retrieval: str) -> None:
    import app as app_module
    from blip_app.config import parse_config

    config = parse_config(["--model", models[0], "--model", models[1], "--trust-model", tiny_retrieval,
                           "--trust", "off"])
    demo, _ = app_module.create_app(config)  # built, not launched
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert "search-run" in ids and "compare-run" in ids
    assert "caption-trust" not in ids and "answer-trust" not in ids


# ------------------------------------------------------------------------------------------------
# The page's handlers


class _Session:
    session_hash = "extra-tests"
    username = None
    headers: dict[str, str] = {}
    client = None


def _no_progress(*args, **kwargs) -> None:
    return None


def upload(path: Path, data: bytes | None = None, name: str | None = None) -> dict:
    """A file as gradio hands an upload to a handler with preprocess=False."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / "blip-app-extra-tests" / os.urandom(6).hex()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or path.name)
    target.write_bytes(data if data is not None else path.read_bytes())
    return {"path": str(target), "orig_name": target.name, "meta": {"_type": "gradio.FileData"}}


@pytest.fixture(scope="module")
def extras(app: RunningApp, models: list[str], tiny_retrieval: str):
    """An Tools on the app's Service, with its chat accordion built in a page of its own."""
    import gradio as gr

    from blip_app.config import parse_config
    from blip_app.core.settings import Task
    from blip_app.web.page import Tabs
    from blip_app.web.ratelimit import RateLimiter
    from blip_app.web.widgets import settings_panel

    config = parse_config([flag for m in models for flag in ("--model", m)] + ["--trust-model", tiny_retrieval])
    made = Tabs.create(app.service, config, RateLimiter(0))
    with gr.Blocks():
        chat = {"state": gr.State(), "chatbot": gr.Chatbot(), "note": gr.Markdown(),
                "history_buttons": [gr.Button(), gr.Button(), gr.Button()],
                "settings": settings_panel(Task.CHAT, app.service.limits).controls}
        made.chat.chat_files(chat, gr.Image(), gr.Dropdown(), gr.Markdown())
    return made


def test_the_trust_line_shows_words_with_the_number_on_hover(extras, tiny_retrieval: str) -> None:
    from blip_app.core.images import load_image
    from blip_app.models.retrieval import Trust, trust_score

    line = extras.caption.score_caption(upload(EXAMPLES / "chelsea.jpg"), "a cat [stopped]")
    expected = trust_score(extras.service, tiny_retrieval, load_image(EXAMPLES / "chelsea.jpg"), "a cat")
    assert f"Image-text match: <strong>{expected.label}</strong>" in line
    assert f"probability {expected.score:.2f}" in line
    answer = extras.ask.score_answer(upload(EXAMPLES / "chelsea.jpg"), "What is it?", "a cat")
    assert "Image-text match:" in answer
    assert extras.caption.score_caption(upload(EXAMPLES / "chelsea.jpg"), "thinking…") == ""
    assert extras.caption.score_caption(None, "a cat") == ""
    hostile = Trust(0.9, "very likely", '"><img src=x onerror=alert(1)>')
    from blip_app.web.widgets import trust_html

    assert "<img" not in trust_html(hostile) and "&lt;img" in trust_html(hostile)


def test_a_trust_model_that_cannot_load_leaves_a_quiet_note(models: list[str]) -> None:
    from blip_app.config import parse_config
    from blip_app.tasks.service import Service
    from blip_app.web.page import Tabs
    from blip_app.web.ratelimit import RateLimiter

    config = parse_config(["--model", models[0], "--offline"])  # the default trust model: not in any cache
    extras = Tabs.create(Service(config.offered_models, config.load), config, RateLimiter(0))
    line = extras.caption.score_caption(upload(EXAMPLES / "chelsea.jpg"), "a cat")
    assert "Image-text match: not available" in line and "title=" in line


def test_shown_reply_drops_the_marks_the_page_adds() -> None:
    from blip_app.web.widgets import shown_reply

    assert shown_reply("a cat [stopped]") == "a cat"
    assert shown_reply("a cat [cut short at the time limit]") == "a cat"
    assert shown_reply("a cat ▍") == "a cat"
    assert shown_reply("(the model gave an empty answer)") == shown_reply("thinking…") == shown_reply(None) == ""


def test_search_handler_ranks_the_uploads(extras) -> None:
    from blip_app.web.common import inert

    files = [upload(EXAMPLES / name) for name in PHOTOS]
    gallery, summary = extras.search.run_search(files, "a cat <b>now</b>", _Session(), _no_progress)
    assert len(gallery) == 3
    scores = [float(caption.split()[0]) for _, caption in gallery]
    assert scores == sorted(scores, reverse=True)
    assert {caption.split(" · ")[-1] for _, caption in gallery} == set(PHOTOS)
    assert inert("a cat <b>now</b>") in summary and "<b>" not in summary  # the query is shown inert
    assert all(max(picture.size) <= 384 for picture, _ in gallery)


def _batch_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.write(EXAMPLES / "chelsea.jpg", "good/chelsea.jpg")
        zf.writestr("good/broken.jpg", b"\xff\xd8\xff" + os.urandom(512))  # named like a photo, it is not one
        zf.writestr("good/notes.txt", "not a photo")
    return buffer.getvalue()


def test_batch_reports_each_bad_member_in_its_row_and_records_model_and_settings(extras, models: list[str]) -> None:
    from blip_app.core.settings import SETTING_NAMES

    files = [upload(EXAMPLES / "rocket.jpg"), upload(Path("photos.zip"), _batch_zip())]
    views = list(extras.batch.run_batch(files, models[0], "short", _Session(), _no_progress, preset="fast",
                                  max_new_tokens=6))
    table, summary, csv_button, jsonl_button, run, stop = views[-1]
    rows = {row[0]: row for row in table}
    assert set(rows) == {"rocket.jpg", "photos.zip/good/chelsea.jpg", "photos.zip/good/broken.jpg",
                         "photos.zip/good/notes.txt"}
    assert rows["photos.zip/good/broken.jpg"][3] and not rows["photos.zip/good/broken.jpg"][1]
    assert "not an image" in rows["photos.zip/good/notes.txt"][3]
    assert rows["rocket.jpg"][3] == "" and isinstance(rows["rocket.jpg"][2], float)
    assert "2** of 4 captioned" in summary and "1 could not" in summary and "1 skipped" in summary
    assert run.visible and not stop.visible and csv_button.interactive and jsonl_button.interactive

    with open(csv_button.value["path"], encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    assert {record["model"] for record in records} == {models[0]}
    for name in SETTING_NAMES:
        assert name in records[0]
    good = next(r for r in records if r["file"] == "rocket.jpg")
    assert good["max_new_tokens"] == "6" and good["num_beams"] == "1"  # the fast preset, with the override
    with open(jsonl_button.value["path"], encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    assert len(lines) == 4 and all(line["model"] == models[0] for line in lines)
    assert csv_button.value["orig_name"].startswith("captions-") and csv_button.value["orig_name"].endswith(".csv")


def test_batch_refuses_too_many_images_before_loading_anything(extras, models: list[str]) -> None:
    limit = extras.batch.max_batch_images
    extras.batch.max_batch_images = 1
    try:
        files = [upload(EXAMPLES / name) for name in PHOTOS[:2]]
        with pytest.warns(UserWarning, match="at most 1 can be handled"):
            views = list(extras.batch.run_batch(files, models[0], "short", _Session(), _no_progress, preset="fast"))
    finally:
        extras.batch.max_batch_images = limit
    assert len(views) == 1 and views[0][4].visible


def _digest(path: Path) -> str:
    from blip_app.core.images import image_digest, load_image

    return image_digest(load_image(path))


def test_export_then_import_continues_the_conversation(extras, models: list[str]) -> None:
    from blip_app.tasks.exports import conversation_from_json
    from blip_app.web.common import inert

    digest = _digest(EXAMPLES / "chelsea.jpg")
    chat = {"image": digest, "turns": [["What is it?", "a cat"], ["Its colour?", "tabby <b>brown</b>"]]}
    settings = {"preset": "fast", "max_new_tokens": 17, "temperature": 0.7, "do_sample": True}
    assert all(button.interactive for button in extras.chat.export_buttons(chat))
    markdown = extras.chat.export_markdown(chat, models[1], None, **settings)  # written when asked for, not before
    json_button = extras.chat.export_json(chat, models[1], None, **settings)
    text = Path(markdown.value["path"]).read_text(encoding="utf-8")
    assert "Reproducibility card" in text and digest in text and "tabby \\<b\\>brown\\</b\\>" in text
    imported = conversation_from_json(Path(json_button.value["path"]))
    assert imported.history == (("What is it?", "a cat"), ("Its colour?", "tabby <b>brown</b>"))
    assert imported.model == models[1] and imported.image_sha256 == digest
    assert imported.settings["max_new_tokens"] == 17 and imported.settings["do_sample"] is True

    # Loaded while the same picture is shown: restored at once, model and settings included.
    record = upload(Path(json_button.value["path"]), name="chat.json")
    out = extras.chat.chat_import(record, {"image": digest, "turns": []}, models[0], None)
    chatbot, state, note, dropdown, status, pending = out[:6]
    # (the export recorded no author per turn: this chat was built by hand)
    assert state == {"image": digest, "turns": chat["turns"], "meta": [{}, {}], "replaced": []} and len(chatbot) == 4
    assert dropdown.value == models[1] and "Loaded 2 turn(s)" in note and pending is None
    assert chatbot[3]["content"] == inert("tabby <b>brown</b>")
    assert all(button.interactive for button in out[6:9])
    sliders = dict(zip(("max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_p",
                        "repetition_penalty", "length_penalty"), out[9:]))
    assert sliders["max_new_tokens"] == 17 and sliders["do_sample"] is True and sliders["temperature"] == 0.7

    # Loaded while another picture is shown: a clear warning, the chat unchanged, the conversation waits.
    other = _digest(EXAMPLES / "rocket.jpg")
    with pytest.warns(UserWarning, match="another picture"):
        out = extras.chat.chat_import(record, {"image": other, "turns": [["hi", "hello"]]}, models[0], None)
    assert "another picture" in out[2] and out[5]["image_sha256"] == digest
    assert out[0] == gr_skip() and out[1] == gr_skip()
    waiting = out[5]
    assert "not the one" in extras.chat.chat_resume({"image": other, "turns": []}, models[0], waiting)[2]
    resumed = extras.chat.chat_resume({"image": digest, "turns": []}, models[0], waiting)
    assert resumed[1]["turns"] == chat["turns"] and resumed[5] is None

    # Not an export at all: refused with its sentence, nothing changes.
    junk = upload(Path("junk.json"), b'{"format": "something else"}')
    with pytest.warns(UserWarning, match="not a blip_app conversation export"):
        out = extras.chat.chat_import(junk, {"image": digest, "turns": []}, models[0], None)
    assert out[1] == gr_skip()


def gr_skip():
    import gradio as gr

    return gr.skip()


def test_an_empty_conversation_offers_no_download(extras, models: list[str]) -> None:
    markdown, json_button = extras.chat.export_buttons({"image": None, "turns": []})
    assert not markdown.interactive and not json_button.interactive


def test_compare_fills_each_column_as_its_model_finishes(extras, models: list[str]) -> None:
    views = list(extras.compare.run_compare(models, "caption", "", "fast", upload(EXAMPLES / "chelsea.jpg"), _Session()))
    first, after_one, final = views[0], views[1], views[-1]
    assert [card.visible for card in final] == [True, True, False]
    assert "writing…" in first[0].value and "waiting" in first[1].value
    assert " s" in after_one[0].value and "writing…" in after_one[1].value
    for card, model in zip(final[:2], models):
        assert Path(model).name in card.value
        assert "compare-meta" in card.value and " s" in card.value
        assert "Image-text match:" in card.value and "match probability" in card.value
    asked = list(extras.compare.run_compare(models, "answer", "What <i>is</i> it?", "fast",
                                    upload(EXAMPLES / "chelsea.jpg"), _Session()))[-1]
    assert all("compare-meta" in card.value for card in asked[:2])


def test_compare_refuses_before_running_anything(extras, models: list[str], tiny_retrieval: str) -> None:
    image = upload(EXAMPLES / "chelsea.jpg")
    for chosen, message in (([models[0]], "two or three"), ([*models, models[0], models[1]], "At most 3"),
                            ([models[0], tiny_retrieval], "image-text matching"), ([models[0], "nope"], "not offered")):
        with pytest.warns(UserWarning, match=message):
            views = list(extras.compare.run_compare(chosen, "caption", "", "fast", image, _Session()))
        assert len(views) == 1
    assert extras.compare.limit_models([*models, "a", "b"], models) == (models, models)
