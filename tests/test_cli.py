"""`python -m blip_app` as a user runs it: real processes, tiny checkpoints, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "blip_app", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.new("RGB", (40, 30), "red").save(folder / "red.png")
    Image.new("RGB", (40, 30), "blue").save(folder / "blue.jpg")
    (folder / "corrupt.jpg").write_bytes(os.urandom(2048))
    return folder


def test_caption_prints_one_caption_per_image(tiny_checkpoints, photos):
    model = str(tiny_checkpoints["blip2-opt"])
    result = run("caption", str(photos / "red.png"), "--model", model, "--preset", "fast")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and result.stdout.strip()


def test_caption_json_lines(tiny_checkpoints, photos):
    model = str(tiny_checkpoints["instructblip-vicuna"])
    result = run("caption", str(photos / "red.png"), str(photos / "blue.jpg"), "--model", model, "--json",
                 "--max-new-tokens", "5", "--num-beams", "1")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(photos / "red.png"), str(photos / "blue.jpg")]
    assert all(set(r) == {"image", "model", "caption"} and r["model"] == model for r in rows)
    assert all(isinstance(r["caption"], str) for r in rows)


def test_ask(tiny_checkpoints, photos):
    result = run("ask", str(photos / "red.png"), "what colour is it?", "--model",
                 str(tiny_checkpoints["blip2-flan-t5"]), "--short")
    assert result.returncode == 0, result.stderr and result.stdout.strip()


def test_models_lists_the_catalog():
    result = run("models")
    assert result.returncode == 0
    assert "blip2-opt-2.7b" in result.stdout and "instructblip-vicuna-13b" in result.stdout
    assert "blip2-itm-vit-g" in result.stdout  # the matching model too, said to be one
    rows = [json.loads(line) for line in run("models", "--json").stdout.splitlines()]
    assert len(rows) == 12 and {r["family"] for r in rows} == {"blip2", "instructblip", "blip2-itm"}
    assert rows[-1]["name"] == "blip2-itm-vit-g" and rows[-1]["language_model"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["caption", "{photos}/red.png", "--model", "blip2-opt-99b"], "Unknown model: blip2-opt-99b"),
        (["caption", "{photos}/corrupt.jpg", "--model", "{tiny}"], "not a readable image"),
        (["caption", "{photos}/missing.png", "--model", "{tiny}"], "missing.png"),
        (["ask", "{photos}/red.png", "   ", "--model", "{tiny}"], "question is empty"),
        (["caption", "{photos}/red.png", "--model", "{tiny}", "--num-beams", "99"], "num_beams is 99"),
        (["caption", "{photos}/red.png", "--model", "Salesforce/blip2-opt-2.7b", "--offline"],
         "not in the local cache and could not be downloaded"),
    ],
)
def test_failures_print_one_line_and_exit_non_zero(tiny_checkpoints, photos, args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    args = [a.format(photos=photos, tiny=tiny_checkpoints["blip2-opt"]) for a in args]
    result = run(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_make_tiny_writes_loadable_checkpoints(tmp_path):
    result = run("make-tiny", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    for family in ("blip2-opt", "blip2-flan-t5", "instructblip-flan-t5", "instructblip-vicuna"):
        assert (tmp_path / "tiny" / family / "config.json").is_file()
    Image.new("RGB", (20, 20), "green").save(tmp_path / "g.png")
    caption = run("caption", str(tmp_path / "g.png"), "--model", str(tmp_path / "tiny" / "blip2-flan-t5"))
    assert caption.returncode == 0, caption.stderr


def test_embed_prints_features_of_images_and_texts(tiny_checkpoints, photos, tmp_path):
    from blip_app.devtools.tiny import make_tiny_retrieval_checkpoint

    matcher = make_tiny_retrieval_checkpoint(tmp_path / "itm")
    result = run("embed", str(photos / "red.png"), "a red square", "--model", str(matcher), "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["kind"] for r in rows] == ["image", "qformer", "itc-image", "qformer-text", "itc-text"]
    assert rows[0]["input"] == str(photos / "red.png") and rows[-1]["input"] == "a red square"
    result = run("embed", "a red square", "--model", str(tiny_checkpoints["blip2-opt"]))
    assert result.returncode == 0 and result.stdout.startswith("a red square  text ")


def test_caption_a_folder_into_csv(tiny_checkpoints, photos, tmp_path):
    result = run("caption", str(photos), "--model", str(tiny_checkpoints["blip2-opt"]), "--preset", "fast",
                 "--csv", str(tmp_path / "out.csv"))
    assert result.returncode == 1  # corrupt.jpg in the folder
    assert len(result.stdout.splitlines()) == 2 and "corrupt.jpg" in result.stderr
    assert (tmp_path / "out.csv").read_text().count("\n") == 4


def test_trust_and_search_from_the_command_line(photos, tmp_path):
    from blip_app.devtools.tiny import make_tiny_retrieval_checkpoint

    matcher = str(make_tiny_retrieval_checkpoint(tmp_path / "itm"))
    trust = run("trust", str(photos / "red.png"), "a red square", "--model", matcher, "--json")
    assert trust.returncode == 0, trust.stderr
    row = json.loads(trust.stdout)
    assert 0.0 <= row["score"] <= 1.0 and row["label"] in ("very likely", "likely", "uncertain", "unlikely")
    found = run("search", "a red square", str(photos / "red.png"), str(photos / "blue.jpg"), "--model", matcher)
    assert found.returncode == 0, found.stderr
    scores = [float(line.split()[0]) for line in found.stdout.splitlines()]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)


def test_a_bad_file_among_several_gets_its_row_and_the_rest_go_on(tiny_checkpoints, photos, tmp_path):
    result = run("caption", str(photos / "red.png"), str(photos / "corrupt.jpg"), str(photos / "blue.jpg"),
                 "--model", str(tiny_checkpoints["blip2-opt"]), "--preset", "fast", "--max-new-tokens", "3",
                 "--csv", str(tmp_path / "out.csv"))
    assert result.returncode == 1  # one of three failed
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == [str(photos / "red.png"),
                                                                             str(photos / "blue.jpg")]
    assert result.stderr.startswith(f"warning: {photos / 'corrupt.jpg'}: ") and "not a readable image" in result.stderr
    assert result.stderr.strip().endswith("error: 1 of 3 images could not be captioned (see above)")
    assert (tmp_path / "out.csv").read_text().count("corrupt.jpg") == 1  # its row, with the reason


def test_search_over_a_folder_with_a_bad_file_goes_on(photos, tmp_path):
    from blip_app.devtools.tiny import make_tiny_retrieval_checkpoint

    matcher = str(make_tiny_retrieval_checkpoint(tmp_path / "itm"))
    found = run("search", "a red square", str(photos), "--model", matcher)  # red, blue and corrupt.jpg
    assert found.returncode == 0, found.stderr
    assert sorted(Path(line.split()[1]).name for line in found.stdout.splitlines()) == ["blue.jpg", "red.png"]
    assert found.stderr.startswith(f"warning: skipped {photos / 'corrupt.jpg'}: ")


def test_top_level_help_lists_every_command():
    from blip_app.__main__ import COMMANDS

    result = run("--help")
    assert result.returncode == 0 and result.stderr == ""
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()]
    assert set(COMMANDS) <= set(listed), listed


def test_stderr_is_quiet_unless_verbose(tiny_checkpoints, photos):
    """No progress bars ("Loading weights"), library warnings or torch notices: only blip_app's own lines."""
    model = str(tiny_checkpoints["instructblip-flan-t5"])  # its tied-weights warning used to be printed
    quiet = run("caption", str(photos / "red.png"), "--model", model, "--preset", "fast", "--max-new-tokens", "3")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    verbose = run("--verbose", "caption", str(photos / "red.png"), "--model", model, "--preset", "fast",
                  "--max-new-tokens", "3")
    assert verbose.returncode == 0 and verbose.stderr != ""


def test_an_empty_answer_says_so(tiny_checkpoints, photos, monkeypatch, capsys):
    from blip_app import __main__ as cli
    from blip_app.models.engine import LoadedModel

    monkeypatch.setattr(LoadedModel, "decode", lambda self, ids: "")
    model = str(tiny_checkpoints["blip2-opt"])
    assert cli.main(["ask", str(photos / "red.png"), "What is it?", "--model", model, "--preset", "fast",
                     "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr()
    # (in this process transformers was imported before main() could quiet it: its bars may show)
    assert printed.out == "\n" and printed.err.endswith("\nnote: the model gave an empty answer\n")
    assert cli.main(["caption", str(photos / "red.png"), str(photos / "blue.jpg"), "--model", model, "--preset",
                     "fast", "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines() == [f"{photos / 'red.png'}: ", f"{photos / 'blue.jpg'}: "]
    notes = [line for line in printed.err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: the model gave an empty answer for {photos / n}" for n in ("red.png", "blue.jpg")]
