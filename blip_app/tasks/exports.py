"""Conversation exports (Markdown and JSON) with a reproducibility card, their import, and batch results.

Importing this module imports no torch: versions are read from package metadata, and the precision a
model ran in from the same decision the loader takes (``devices.plan_load``), so exporting never loads
or touches a model.

JSON export layout (``format`` "blip_app.conversation", ``version`` 1)::

    {"format": "blip_app.conversation", "version": 1,
     "card": {"model", "source", "revision", "precision", "device", "seed", "settings": {...every
              generation setting...}, "image_sha256", "versions": {"blip_app", "transformers", "torch"},
              "created"},
     "turns": [{"question": "...", "answer": "...", "trust": 0.91 or null,
                "model": "...", "preset": "...", "settings": {...}}, ...]}

The card describes the conversation as it stands (the model and settings its next answer would use); each
turn records the model, preset and settings that wrote its answer (a conversation may switch models), when
the page knew them.

The image itself is never exported: its SHA-256 (:func:`images.image_digest` of the decoded picture)
lets the importer check that the same picture is uploaded before the conversation continues.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from blip_app import __version__
from blip_app.core.prompts import Turn
from blip_app.core.settings import SETTING_NAMES, GenerationSettings, Limits, Preset, Task, resolve_settings
from blip_app.errors import BadInputError, SettingsError

FORMAT = "blip_app.conversation"
VERSION = 1

MAX_IMPORT_BYTES = 2 * 1024 * 1024
MAX_IMPORT_TURNS = 500
# Per question, as in chat (AppConfig.max_message_chars; the app passes its own); an answer may be
# service.ANSWER_CHARS_FACTOR times longer, as in chat.
MAX_IMPORT_CHARS = 2000
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------------------------------
# The reproducibility card.


def package_versions() -> dict[str, str]:
    """Versions of blip_app, transformers and torch (from package metadata; nothing is imported)."""
    versions = {"blip_app": __version__}
    for package in ("transformers", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _settings_dict(settings: GenerationSettings | Mapping[str, Any]) -> dict[str, Any]:
    data = settings.as_dict() if isinstance(settings, GenerationSettings) else dict(settings)
    unknown = sorted(set(data) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"Unknown generation settings: {', '.join(unknown)}")
    return {name: data.get(name) for name in SETTING_NAMES}


def reproducibility_card(
    *,
    model: str,
    source: str,
    settings: GenerationSettings | Mapping[str, Any],
    image_sha256: str | None,
    revision: str | None = None,
    precision: str | None = None,
    device: str | None = None,
    created: datetime | None = None,
) -> dict[str, Any]:
    """Everything needed to redo a conversation: model and where it came from, precision, settings, image hash."""
    values = _settings_dict(settings)
    return {
        "model": model,
        "source": source,
        "revision": revision,
        "precision": precision,
        "device": device,
        "seed": values.get("seed"),
        "settings": values,
        "image_sha256": image_sha256,
        "versions": package_versions(),
        "created": (created or datetime.now(UTC)).isoformat(timespec="seconds"),
    }


def _cached_revision(repo_id: str, cache_dir: str | None) -> str | None:
    """The commit of a hub repository's snapshot in the local cache (its folder name), if there is one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - a revision is nice to have, never required
        return None
    if isinstance(path, str) and Path(path).parent.parent.name == "snapshots":
        return Path(path).parent.name
    return None


def card_for(service: Any, model: str, settings: GenerationSettings | Mapping[str, Any], image: Any = None, *,
             image_sha256: str | None = None, hardware: Any = None) -> dict[str, Any]:
    """The card for a conversation held with ``model`` on ``service``, without loading anything.

    Precision and device are what the loader decides for this model with the service's load options
    (``devices.plan_load``, the same decision); the revision is the one asked for, else the cached
    snapshot's commit for a hub model, else None (a local folder). ``image`` is hashed with
    :func:`images.image_digest` unless ``image_sha256`` is given.
    """
    from blip_app.core.catalog import read_kind

    manager = getattr(service, "manager", service)
    ref = manager.ref(model)
    options = manager.options
    revision = options.revision or (None if ref.is_local else _cached_revision(ref.source, options.cache_dir))
    precision = device = None
    try:
        from blip_app.core.devices import plan_load
        from blip_app.models.hardware import detect_hardware

        language_model = getattr(ref.entry, "language_model", None)
        if language_model is None and ref.is_local:
            language_model = read_kind(ref.source).language_model
        if language_model is not None:
            plan = plan_load(language_model, options, hardware or detect_hardware())
            precision, device = plan.precision_label, plan.device
    except Exception:  # noqa: BLE001 - the card says "unknown" rather than failing the download
        pass
    if image_sha256 is None and image is not None:
        from blip_app.core.images import image_digest

        image_sha256 = image_digest(image)
    return reproducibility_card(model=ref.name, source=ref.source, settings=settings, image_sha256=image_sha256,
                                revision=revision, precision=precision, device=device)


def _history(history: Sequence[Turn | Sequence[str]]) -> list[tuple[str, str]]:
    pairs = []
    for item in history:
        if isinstance(item, Turn):
            pairs.append((item.question, item.answer))
        else:
            question, answer = item
            pairs.append((str(question), str(answer or "")))
    return pairs


# --------------------------------------------------------------------------------------------------
# Export.


TURN_META = ("model", "label", "preset", "settings")  # what a turn records about the answer's author


def conversation_to_dict(history: Sequence[Turn | Sequence[str]], card: Mapping[str, Any],
                         trust: Sequence[float | None] | None = None,
                         meta: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON export as plain data. ``trust`` gives each answer's match probability (or None); ``meta``
    each answer's model, label, preset and settings (empty where unknown)."""
    pairs = _history(history)
    scores = list(trust or [None] * len(pairs))
    if len(scores) != len(pairs):
        raise ValueError(f"{len(scores)} trust scores for {len(pairs)} turns")
    infos = list(meta or [])
    infos += [{}] * (len(pairs) - len(infos))
    turns = []
    for (q, a), s, info in zip(pairs, scores, infos):
        turn = {"question": q, "answer": a, "trust": None if s is None else round(float(s), 4)}
        turn.update({key: info[key] for key in TURN_META if info.get(key) not in (None, "", {})})
        turns.append(turn)
    return {"format": FORMAT, "version": VERSION, "card": dict(card), "turns": turns}


def conversation_to_json(history: Sequence[Turn | Sequence[str]], card: Mapping[str, Any],
                         trust: Sequence[float | None] | None = None,
                         meta: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The conversation and its card as indented JSON (UTF-8 text, loadable by :func:`conversation_from_json`)."""
    return json.dumps(conversation_to_dict(history, card, trust, meta), ensure_ascii=False, indent=2) + "\n"


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|!~])")


def _md(text: Any) -> str:
    """Text shown literally in Markdown: special characters escaped, line breaks kept."""
    escaped = _MD_SPECIAL.sub(r"\\\1", str(text))
    escaped = re.sub(r"^(\s*)([-+]|\d+[.)])(\s)", r"\1\\\2\3", escaped, flags=re.MULTILINE)
    return escaped.replace("\n", "  \n")


def conversation_to_markdown(history: Sequence[Turn | Sequence[str]], card: Mapping[str, Any],
                             trust: Sequence[float | None] | None = None,
                             meta: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The conversation as Markdown: the card as a table, the settings as JSON, then the turns, each answer
    under the model that wrote it (with its preset and settings when they differ from the card's)."""
    from blip_app.models.retrieval import confidence_label  # imported here: retrieval imports torch

    data = conversation_to_dict(history, card, trust, meta)
    card = data["card"]
    versions = card.get("versions") or {}
    rows = [
        ("Model", f"{card.get('model')} ({card.get('source')})"),
        ("Revision", card.get("revision") or "not recorded"),
        ("Precision", f"{card.get('precision') or 'unknown'} on {card.get('device') or 'unknown'}"),
        ("Seed", card.get("seed") if card.get("seed") is not None else "none (deterministic decoding)"),
        ("Image SHA-256", card.get("image_sha256") or "none"),
        ("Versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
        ("Exported", card.get("created")),
    ]
    lines = ["# Conversation about an image", "", "## Reproducibility card", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_md(value)} |" for name, value in rows]
    settings = json.dumps(card.get("settings") or {}, indent=2)
    lines += ["", "Generation settings:", "", "```json", settings, "```", "", "## Conversation", ""]
    for turn in data["turns"]:
        lines += [f"**You:** {_md(turn['question'])}", ""]
        note = ""
        if turn["trust"] is not None:
            note = f" _(image match: {confidence_label(turn['trust'])}, {turn['trust']:.2f})_"
        speaker = _md(turn.get("label") or turn.get("model") or card.get("model") or "model")
        lines += [f"**{speaker}:** {_md(turn['answer'])}{note}", ""]
        how = [f"preset {turn['preset']}"] if turn.get("preset") else []
        if turn.get("settings") and turn["settings"] != card.get("settings"):
            how.append("settings " + ", ".join(f"{k}={v}" for k, v in turn["settings"].items() if v is not None))
        if how:
            lines += [f"_{_md('; '.join(how))}_", ""]
    return "\n".join(lines).rstrip() + "\n"


def save_text(text: str, filename: str, directory: str | Path | None = None) -> Path:
    """Write an export to a new file named ``filename`` (made safe) in ``directory`` (a new temp dir by default)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).name).strip("._") or "export"
    folder = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="blip_app-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / safe
    path.write_text(text, encoding="utf-8", newline="")  # the text chooses its line endings (CSV: CRLF)
    return path


def export_filename(model: str, suffix: str, created: datetime | None = None) -> str:
    """A file name such as ``conversation-blip2-opt-2.7b-20260101-120000.md``."""
    stamp = (created or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    label = re.sub(r"[^A-Za-z0-9.-]+", "_", Path(model).name)[:60] or "model"
    return f"conversation-{label}-{stamp}.{suffix.lstrip('.')}"


# --------------------------------------------------------------------------------------------------
# Import.


@dataclass(frozen=True)
class ImportedConversation:
    """A conversation read back from a JSON export, validated."""

    history: tuple[tuple[str, str], ...]  # (question, answer) pairs, as the chat takes them
    model: str
    settings: dict[str, Any]  # every generation setting: usable as overrides
    image_sha256: str | None
    trust: tuple[float | None, ...]
    card: dict[str, Any]
    meta: tuple[dict[str, Any], ...] = ()  # per turn: the model, label, preset and settings that wrote it

    @property
    def turns(self) -> tuple[Turn, ...]:
        """The history as prompts.Turn values."""
        return tuple(Turn(q, a) for q, a in self.history)

    def matches_image(self, image: Any) -> bool:
        """Whether ``image`` (decoded, as load_image returns it) is the picture the conversation was about."""
        from blip_app.core.images import image_digest

        return self.image_sha256 is not None and image_digest(image) == self.image_sha256


def _refuse(message: str) -> BadInputError:
    return BadInputError(f"This conversation file cannot be loaded: {message}")


def conversation_from_json(data: str | bytes | Path | Any, *, max_bytes: int = MAX_IMPORT_BYTES,
                           max_turns: int = MAX_IMPORT_TURNS, max_chars: int = MAX_IMPORT_CHARS
                           ) -> ImportedConversation:
    """Read a JSON export back; BadInputError says what is wrong.

    ``data`` is the JSON text, its bytes, a binary stream, a Path, or a str naming an existing file
    (as gr.File hands uploads over). Refused: more than ``max_bytes``, not UTF-8 JSON, another format
    or a newer version, a card without model or settings, settings out of range, a bad image hash,
    more than ``max_turns`` turns, a turn that chat would refuse (a question over ``max_chars``
    characters, an answer over ``max_chars`` times service.ANSWER_CHARS_FACTOR, a broken character):
    the turns are cleaned and limited by the very function that cleans a chat's earlier turns.
    """
    from blip_app.tasks.service import clean_turn  # imports no torch

    raw = _read(data, max_bytes)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _refuse("it is not UTF-8 text.") from None
    try:
        document = json.loads(text, parse_constant=lambda name: _reject_constant(name))
    except RecursionError:
        raise _refuse("it is nested too deeply.") from None
    except json.JSONDecodeError as exc:
        raise _refuse(f"it is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    except ValueError as exc:
        raise _refuse(f"it holds a value JSON does not allow ({exc}).") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise _refuse(f"it is not a blip_app conversation export (format {str(found)[:60]!r}, expected {FORMAT!r}).")
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _refuse(f"its version {str(version)[:20]!r} is not a version number.")
    if version > VERSION:
        raise _refuse(f"it was written by a newer blip_app (format version {version}; this one reads {VERSION}).")
    card = document.get("card")
    if not isinstance(card, dict):
        raise _refuse("its reproducibility card is missing.")
    model = card.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > 500:
        raise _refuse("the card does not name the model.")
    settings = _imported_settings(card.get("settings"))
    digest = card.get("image_sha256")
    if digest is not None and (not isinstance(digest, str) or not _SHA256.fullmatch(digest)):
        raise _refuse("the image hash in the card is not a SHA-256 hex digest.")
    turns = document.get("turns")
    if not isinstance(turns, list):
        raise _refuse("it has no list of turns.")
    if len(turns) > max_turns:
        raise _refuse(f"it has {len(turns):,} turns; at most {max_turns:,} can be loaded.")
    history, trust, meta = [], [], []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise _refuse(f"turn {number} is not an object with a question and an answer.")
        try:
            cleaned = clean_turn(turn.get("question"), turn.get("answer"), max_chars=max_chars, number=number)
        except BadInputError as exc:
            raise _refuse(str(exc)) from None
        question, answer = cleaned.question, cleaned.answer
        score = turn.get("trust")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                  or not 0.0 <= score <= 1.0):
            raise _refuse(f"the trust score of turn {number} is not a probability between 0 and 1.")
        history.append((question, answer))
        trust.append(None if score is None else float(score))
        meta.append(_turn_meta(turn, number))
    return ImportedConversation(tuple(history), model.strip(), settings, digest, tuple(trust), card, tuple(meta))


def _turn_meta(turn: Mapping[str, Any], number: int) -> dict[str, Any]:
    """Who wrote a turn's answer, as the export recorded it (checked like the card's model and settings)."""
    info: dict[str, Any] = {}
    for key in ("model", "label", "preset"):
        value = turn.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > 500:
            raise _refuse(f"the {key} of turn {number} is not a name.")
        info[key] = value
    if turn.get("settings") is not None:
        info["settings"] = _imported_settings(turn.get("settings"))
    return info


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _read(data: str | bytes | Path | Any, max_bytes: int) -> bytes:
    if isinstance(data, str) and not data.lstrip().startswith("{") and os.path.isfile(data):
        data = Path(data)  # a path, as gr.File hands over uploads; an export itself starts with "{"
    if isinstance(data, str):
        raw = data.encode("utf-8")
    elif isinstance(data, (bytes, bytearray)):
        raw = bytes(data)
    elif isinstance(data, Path):
        try:
            size = data.stat().st_size
        except OSError as exc:
            raise _refuse(f"{data.name} cannot be read ({exc.strerror}).") from None
        if size > max_bytes:
            raise _refuse(f"it is {_size(size)}; at most {_size(max_bytes)} is accepted.")
        raw = data.read_bytes()
    elif hasattr(data, "read"):
        raw = data.read(max_bytes + 1)
    else:
        raise TypeError(f"cannot read a conversation from {type(data).__name__}")
    if len(raw) > max_bytes:
        raise _refuse(f"it is larger than {_size(max_bytes)}, the most that is accepted.")
    if not raw.strip():
        raise _refuse("it is empty.")
    return raw


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 100_000 else f"{n_bytes:,} bytes"


def _imported_settings(settings: Any) -> dict[str, Any]:
    if not isinstance(settings, dict):
        raise _refuse("the card has no generation settings.")
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise _refuse(f"unknown generation settings in the card: {', '.join(map(str, unknown))[:200]}.")
    for name, value in settings.items():
        if value is not None and not isinstance(value, (int, float, bool)):
            raise _refuse(f"the setting {name} is {type(value).__name__}, not a number.")
        if isinstance(value, float) and not math.isfinite(value):
            raise _refuse(f"the setting {name} is not a finite number.")
    uncapped = Limits(max_new_tokens=2**31, num_beams=2**31)  # the server's caps apply when it is used
    try:
        resolved = resolve_settings(Task.CHAT, Preset.STANDARD, settings, limits=uncapped)
    except SettingsError as exc:
        raise _refuse(str(exc)) from None
    return {name: getattr(resolved, name) for name in SETTING_NAMES}


# --------------------------------------------------------------------------------------------------
# Batch caption results.

BATCH_COLUMNS = ("file", "caption", "model", *SETTING_NAMES, "seconds", "error")
# OWASP's list of characters a spreadsheet may read as the start of a formula: at the start of a cell,
# and after every line break inside one (an importer may split a cell's lines into rows or cells).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
_FORMULA_AFTER_BREAK = re.compile(r"(?<=[\r\n])(?=[=+\-@\t])")


def batch_rows(results: Iterable[Any]) -> list[dict[str, Any]]:
    """One flat record per batch result (see batch.BatchResult): file, caption, model, every setting, seconds, error."""
    rows = []
    for result in results:
        settings = _settings_dict(result.settings) if result.settings is not None else dict.fromkeys(SETTING_NAMES)
        rows.append({"file": result.name, "caption": result.caption, "model": result.model, **settings,
                     "seconds": None if result.seconds is None else round(result.seconds, 3),
                     "error": result.error})
    return rows


def _csv_cell(value: Any) -> Any:
    """Text a spreadsheet could run as a formula gets a leading quote, on every line; numbers stay numbers."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return value
    value = _FORMULA_AFTER_BREAK.sub("'", value)
    return "'" + value if value.startswith(_FORMULA_START) else value


def batch_to_csv(results: Iterable[Any]) -> str:
    """Batch results as CSV (RFC 4180) with a header row; no cell can start a formula.

    Every field that holds a line break, a bare carriage return included, is quoted (the csv module
    quotes the characters of its line terminator, hence CRLF), and a line of a cell that starts with
    = + - @ or a tab (or a cell that starts with a line break) gets a leading '.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=BATCH_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for row in batch_rows(results):
        writer.writerow({key: _csv_cell(value) for key, value in row.items()})
    return buffer.getvalue()


def batch_to_jsonl(results: Iterable[Any]) -> str:
    """Batch results as JSON Lines: one object per image, values as they are."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in batch_rows(results))
