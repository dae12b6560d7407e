"""Captioning many images: expanding files, folders and zip archives, and running them through the service.

:func:`iter_images` turns what the user gave into named items whose pictures are decoded only when
captioned (a folder of thousands of photos is never all in memory). :func:`caption_many` sends them
through :class:`service.Service` a few at a time, so the engine serves the ones that wait together
in one batch and the model's feature cache applies; an image that fails gets its error message in
its row and the batch goes on.

Zip archives are read in memory, never extracted. An archive is refused whole if a member's name
could escape a folder (absolute, a drive letter, ``..``), if it has too many members or declares too
many uncompressed bytes; members that are not images are skipped with a note.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import stat
import threading
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from blip_app.core.images import ImageLimits, load_image
from blip_app.core.settings import GenerationSettings, Preset, Task
from blip_app.errors import BadImageError, BadInputError, BlipAppError, user_message
from blip_app.models.kinds import Captioner

log = logging.getLogger(__name__)

# Extensions of the formats images.load_image accepts (it checks the content itself, whatever the name).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp"})
ARCHIVE_EXTENSIONS = frozenset({".zip"})


@dataclass(frozen=True)
class ZipLimits:
    """What a zip archive may hold."""

    max_members: int = 2000  # entries, folders included
    max_total_bytes: int = 1024 * 1024 * 1024  # declared uncompressed size of all members


@dataclass(frozen=True)
class BatchItem:
    """One picture to caption: a name for people and a function that decodes it (None: skipped)."""

    name: str
    load: Callable[[], Image.Image] | None
    note: str | None = None  # why it was skipped

    @property
    def skipped(self) -> bool:
        """Whether this entry is only a note (not an image)."""
        return self.load is None


def _is_hidden(parts: Sequence[str]) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _unsafe_member(name: str) -> bool:
    """A member name that would leave the folder it is extracted into."""
    posix = name.replace("\\", "/")
    path = PurePosixPath(posix)
    return (path.is_absolute() or bool(re.match(r"^[A-Za-z]:", posix)) or ".." in path.parts
            or "\x00" in name)


def _read_member(archive: str, member: str, limits: ImageLimits) -> Image.Image:
    try:
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(member)
            if info.file_size > limits.max_bytes:
                raise BadImageError(f"{member} is {info.file_size / 1e6:.1f} MB; images of at most "
                                    f"{limits.max_bytes / 1e6:.0f} MB are accepted.")
            with zf.open(info) as handle:
                data = handle.read(limits.max_bytes + 1)
    except BadImageError:
        raise
    except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError, EOFError) as exc:
        raise BadImageError(f"{member} could not be read from the archive ({exc}).") from exc
    return load_image(data, limits)


def _zip_items(path: Path, display: str, limits: ZipLimits, image_limits: ImageLimits) -> Iterator[BatchItem]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadInputError(f"{display} is not a readable zip archive ({exc}).") from exc
    with archive:
        infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise BadInputError(f"{display} holds {len(infos):,} entries; archives of at most "
                            f"{limits.max_members:,} are accepted.")
    for info in infos:
        if _unsafe_member(info.filename):
            raise BadInputError(f"{display} was refused: its entry {info.filename[:200]!r} points outside the "
                                "archive's folder.")
    total = sum(info.file_size for info in infos if not info.is_dir())
    if total > limits.max_total_bytes:
        raise BadInputError(f"{display} unpacks to {total / 1e6:,.0f} MB; archives of at most "
                            f"{limits.max_total_bytes / 1e6:,.0f} MB uncompressed are accepted.")
    for info in sorted(infos, key=lambda i: i.filename):
        member = info.filename
        parts = PurePosixPath(member.replace("\\", "/")).parts
        if info.is_dir() or _is_hidden(parts):
            continue  # folders, and the dot files / __MACOSX copies archivers add
        name = f"{display}/{member}"
        suffix = PurePosixPath(parts[-1]).suffix.lower()
        if info.flag_bits & 0x1:
            yield BatchItem(name, None, "skipped: the file is encrypted")
        elif stat.S_ISLNK(info.external_attr >> 16):
            yield BatchItem(name, None, "skipped: a symbolic link, not a file")
        elif suffix in ARCHIVE_EXTENSIONS:
            yield BatchItem(name, None, "skipped: archives inside archives are not opened")
        elif suffix not in IMAGE_EXTENSIONS:
            yield BatchItem(name, None, f"skipped: not an image ({suffix or 'no extension'})")
        else:
            yield BatchItem(name, functools.partial(_read_member, str(path), member, image_limits))


def _folder_items(folder: Path, display: str, image_limits: ImageLimits) -> Iterator[BatchItem]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for file in files:
            if file.startswith(".") or Path(file).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            found.append(Path(root, file).relative_to(folder))
    for relative in sorted(found, key=lambda p: p.as_posix()):
        yield BatchItem(os.path.join(display, str(relative)),
                        functools.partial(load_image, folder / relative, image_limits))


def iter_images(paths: Iterable[str | os.PathLike[str]], *, zip_limits: ZipLimits = ZipLimits(),
                image_limits: ImageLimits = ImageLimits()) -> Iterator[BatchItem]:
    """Expand files, folders (recursive, sorted, image extensions only) and zip archives into items.

    A file is taken as an image whatever its name (load_image checks the content), unless it ends in
    .zip. Raises BadInputError for a path that does not exist or an archive that is refused.
    """
    for raw in paths:
        display = os.fspath(raw)
        path = Path(display).expanduser()
        if path.is_dir():
            yield from _folder_items(path, display, image_limits)
        elif path.is_file():
            if path.suffix.lower() in ARCHIVE_EXTENSIONS:
                yield from _zip_items(path, display, zip_limits, image_limits)
            else:
                yield BatchItem(display, functools.partial(load_image, path, image_limits))
        else:
            raise BadInputError(f"No such file or folder: {display}")


@dataclass(frozen=True)
class BatchResult:
    """The outcome for one item: its caption, or the message saying why there is none."""

    index: int  # position among the items
    name: str
    caption: str | None
    model: str
    settings: GenerationSettings | None  # every setting the caption was made with
    seconds: float | None  # from submission to caption (images captioned together share the time)
    error: str | None = None
    skipped: bool = False  # not an image: ``error`` holds the note

    @property
    def ok(self) -> bool:
        """Whether there is a caption."""
        return self.error is None


ProgressFn = Callable[[int, int, str], None]


def caption_many(
    service: Any,
    model: str,
    items: Iterable[BatchItem],
    preset: Preset | str = Preset.STANDARD,
    overrides: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    *,
    detailed: bool = False,
    workers: int = 4,
    cancel: threading.Event | None = None,
) -> Iterator[BatchResult]:
    """Caption every item with ``model``; yield one result per item, in order, as each is ready.

    Settings are validated before any model loads (SettingsError). The model is held for the whole
    batch. ``workers`` images are in flight at once: the engine batches those waiting for the device.
    ``progress(done, total, name)`` is called from the calling thread after each result (with Gradio:
    ``lambda done, total, name: progress((done, total), desc=name)``). Setting ``cancel`` stops the
    batch: images not started are dropped, the ones running stop at their next token.
    """
    items = list(items)
    request = service.request(Task.CAPTION, preset=preset, overrides=overrides, detailed=detailed)
    cancel = cancel or threading.Event()
    total = len(items)
    with service.manager.use(model) as loaded:
        if not isinstance(loaded, Captioner):
            raise BadInputError(f"{model} is an image-text matching model; it cannot write captions.")
        settings = service.settings_for(loaded, request)

        def run(index: int, item: BatchItem) -> BatchResult:
            if item.load is None:
                return BatchResult(index, item.name, None, model, settings, None, item.note, skipped=True)
            try:
                reply = service.run(model, item.load(), request, cancel=cancel)
            except BlipAppError as exc:
                return BatchResult(index, item.name, None, model, settings, None, str(exc))
            except Exception as exc:  # noqa: BLE001 - one bad image never ends the batch
                log.exception("Captioning %s failed", item.name)
                return BatchResult(index, item.name, None, model, settings, None, user_message(exc))
            return BatchResult(index, item.name, reply.text, model, reply.settings, reply.seconds)

        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="caption")
        pending: deque[Future[BatchResult]] = deque()
        queue = iter(enumerate(items))
        finished = False
        try:
            for _ in range(max(1, workers)):
                _submit(pool, pending, queue, run)
            done = 0
            while pending and not cancel.is_set():
                result = pending.popleft().result()
                _submit(pool, pending, queue, run)
                done += 1
                if progress is not None:
                    progress(done, total, result.name)
                yield result
            finished = not pending
        finally:
            if not finished:
                cancel.set()  # the consumer stopped early: stop the captions still running
            pool.shutdown(wait=True, cancel_futures=True)


def _submit(pool: ThreadPoolExecutor, pending: deque, queue: Iterator[tuple[int, BatchItem]],
            run: Callable[[int, BatchItem], BatchResult]) -> None:
    step = next(queue, None)
    if step is not None:
        pending.append(pool.submit(run, *step))
