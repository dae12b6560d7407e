"""Command-line pieces for ``python -m blip_app``: the ``embed`` command, and ``caption`` over folders and zips.

``__main__`` wires them in: :func:`add_embed_parser` / :func:`cmd_embed`, and for ``caption``
:func:`add_caption_batch_options` / :func:`cmd_caption`. Errors are raised as blip_app errors;
``__main__.main`` turns them into one line on stderr and the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from blip_app.config import DEFAULT_TRUST_MODEL
from blip_app.core.devices import PRECISIONS, LoadOptions
from blip_app.core.settings import SETTING_NAMES, Preset
from blip_app.errors import BadInputError

_PREVIEW = 6  # values shown per embedding without --json
EMPTY_ANSWER = "note: the model gave an empty answer"


def overrides(args: argparse.Namespace) -> dict[str, object]:
    """The generation settings given as flags (the others stay the preset's)."""
    return {name: getattr(args, name) for name in SETTING_NAMES if getattr(args, name, None) is not None}


def _options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(device=args.device, precision=args.precision, quantization=getattr(args, "quantization", "none"),
                       local_files_only=args.offline or os.environ.get("HF_HUB_OFFLINE") == "1",
                       cpu_speedups=not getattr(args, "no_cpu_speedups", False))


def _service(args: argparse.Namespace) -> tuple[Any, str]:
    """A service offering ``args.model`` (retrieval catalog names included) and the name to use with it."""
    from blip_app.models.loading import Loader
    from blip_app.models.manager import ModelManager
    from blip_app.tasks.service import Service

    options = _options(args)
    manager = ModelManager([args.model], options, loader=Loader())
    return Service([args.model], options, manager=manager), manager.names[0]


# --------------------------------------------------------------------------------------------------
# embed


def add_embed_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``embed IMAGE_OR_TEXT... [--model NAME] [--json]`` to a sub-command set."""
    parser = commands.add_parser(
        "embed", help="print the features a model gives for images and texts",
        description="An argument naming an existing file is an image; any other argument is a text. "
                    "The image-text matching model gives its projected embeddings (the ones search uses); "
                    "a captioning model gives its vision, Q-Former and language-model features.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_TEXT")
    parser.add_argument("--model", default=DEFAULT_TRUST_MODEL,
                        help="image-text matching or captioning model (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line with the full vectors")
    parser.add_argument("--instruction", default="", help="InstructBLIP only: the text its Q-Former reads")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--offline", action="store_true", help="never download; local cache and folders only")
    return parser


def _inputs(arguments: list[str]) -> tuple[list[Any], list[str]]:
    """Images (decoded now, so a bad one fails before a model loads) and texts, with their names."""
    from blip_app.core.images import load_image

    items: list[Any] = []
    for argument in arguments:
        items.append(load_image(argument) if Path(argument).is_file() else argument)
    return items, list(arguments)


def format_embedding(embedding: Any, *, width: int = 0) -> str:
    """One line: input, kind, shape, norm and the first values (of the mean, for several rows)."""
    shape = "x".join(str(n) for n in embedding.shape)
    values = ", ".join(f"{float(v):.4f}" for v in embedding.pooled[:_PREVIEW])
    more = ", ..." if embedding.pooled.numel() > _PREVIEW else ""
    mean = "mean " if len(embedding.shape) > 1 else ""
    return (f"{embedding.source:{width}}  {embedding.kind:12} {shape:>9}  norm {embedding.norm:9.4f}  "
            f"{mean}[{values}{more}]")


def cmd_embed(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print each input's embeddings: kind, dimension, norm and first values; or JSON Lines with --json."""
    from blip_app.models.retrieval import embed

    out = out or sys.stdout
    items, names = _inputs(args.inputs)
    service, name = _service(args)
    embeddings = embed(service, name, items, names=names, instruction=args.instruction)
    width = min(40, max(len(e.source) for e in embeddings))
    for embedding in embeddings:
        if args.json:
            data = embedding.as_dict(full=True)
            data["model"] = args.model
            out.write(json.dumps(data, ensure_ascii=False) + "\n")
        else:
            out.write(format_embedding(embedding, width=width) + "\n")
    out.flush()
    return 0


def add_trust_parsers(commands: Any) -> None:
    """Add ``trust IMAGE TEXT`` and ``search QUERY IMAGE_FOLDER_OR_ZIP...`` to a sub-command set."""
    for name, helptext in (("trust", "how well a text matches an image (the image-text matching score)"),
                           ("search", "rank images (files, folders, zips) by how well they match a sentence")):
        parser = commands.add_parser(name, help=helptext)
        if name == "trust":
            parser.add_argument("image", metavar="IMAGE")
            parser.add_argument("text", metavar="TEXT")
        else:
            parser.add_argument("query", metavar="QUERY")
            parser.add_argument("images", nargs="+", metavar="IMAGE_FOLDER_OR_ZIP")
        parser.add_argument("--model", default=DEFAULT_TRUST_MODEL,
                            help="image-text matching model (default: %(default)s)")
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
        parser.add_argument("--precision", choices=PRECISIONS, default="auto")
        parser.add_argument("--offline", action="store_true", help="never download; local cache and folders only")


def cmd_trust(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the match probability of TEXT for IMAGE with its plain-language label."""
    from blip_app.core.images import load_image
    from blip_app.models.retrieval import trust_score

    out = out or sys.stdout
    image = load_image(args.image)
    service, name = _service(args)
    trust = trust_score(service, name, image, args.text)
    if args.json:
        out.write(json.dumps({"image": args.image, "text": args.text, "model": args.model, **trust.as_dict()},
                             ensure_ascii=False) + "\n")
    else:
        out.write(f"{trust.label} ({trust.score:.3f})\n")
    return 0


def cmd_search(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the images ranked by how well they match QUERY, best first."""
    from blip_app.models.retrieval import search
    from blip_app.tasks.batch import iter_images

    out = out or sys.stdout
    items = list(iter_images(args.images))
    images, names = [], []
    from blip_app.errors import BadImageError

    for item in items:
        if item.load is None:
            sys.stderr.write(f"note: skipped {item.name}: {item.note}\n")
            continue
        try:
            images.append(item.load())
        except BadImageError as exc:  # one unreadable photo: named, and the search goes on without it
            sys.stderr.write(f"warning: skipped {item.name}: {exc}\n")
            continue
        names.append(item.name)
    if not images:
        raise BadImageError("No readable image was given to search.")
    service, name = _service(args)
    hits = search(service, name, images, args.query, names=names)
    for hit in hits:
        out.write((json.dumps(hit.as_dict(), ensure_ascii=False) if args.json
                   else f"{hit.score:.3f}  {hit.name}") + "\n")
    return 0


# --------------------------------------------------------------------------------------------------
# caption over files, folders and zip archives


def add_caption_batch_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--csv PATH``, ``--jsonl PATH`` and ``--workers N`` to the caption parser."""
    parser.add_argument("--csv", metavar="PATH", help="also write every result (model and settings included) as CSV")
    parser.add_argument("--jsonl", metavar="PATH", help="also write every result as JSON Lines")
    parser.add_argument("--workers", type=int, default=4,
                        help="images in flight at once; those waiting are captioned together (default: 4)")


def cmd_caption(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Caption images, folders (recursive) and zip archives; one line (or JSON object) per image.

    A single image that cannot be read fails the command before any model loads, as ``ask`` does. Among
    several images (files, folders, archives) one that fails is reported on stderr and in the CSV /
    JSON Lines files, and the command goes on (exit status 1 at the end). An empty caption is printed as
    an empty line (one line per image) with a note on stderr.
    """
    from blip_app.tasks.batch import BatchItem, caption_many, iter_images
    from blip_app.tasks.exports import batch_to_csv, batch_to_jsonl

    out, err = out or sys.stdout, err or sys.stderr
    if args.workers < 1:
        raise BadInputError(f"--workers must be at least 1, not {args.workers}.")
    items = list(iter_images(args.images))
    if len(items) == 1 and items[0].load is not None and items[0].name == os.fspath(args.images[0]):
        image = items[0].load()  # BadImageError: the command fails here, as for a single image
        items[0] = BatchItem(items[0].name, lambda image=image: image)
    if not any(item.load is not None for item in items):
        raise BadInputError("No images were found in " + ", ".join(os.fspath(p) for p in args.images) + ".")
    service, name = _service(args)
    preset = Preset.DETAILED if args.detailed and args.preset == Preset.STANDARD.value else Preset(args.preset)
    results, failed = [], 0
    several = len(items) > 1
    for result in caption_many(service, name, items, preset, overrides(args), detailed=args.detailed,
                               workers=args.workers):
        result = _relabel(result, args.model)
        results.append(result)
        if result.error is not None:
            failed += 0 if result.skipped else 1
            err.write(f"{'note' if result.skipped else 'warning'}: {result.name}: {result.error}\n")
        elif args.json:
            out.write(json.dumps({"image": result.name, "model": args.model, "caption": result.caption},
                                 ensure_ascii=False) + "\n")
        else:
            out.write(f"{result.name}: {result.caption}\n" if several else f"{result.caption}\n")
        if result.error is None and not (result.caption or "").strip():
            err.write(f"{EMPTY_ANSWER}" + (f" for {result.name}\n" if several else "\n"))
        out.flush()
    if args.csv:
        _write(args.csv, batch_to_csv(results))
    if args.jsonl:
        _write(args.jsonl, batch_to_jsonl(results))
    if failed:
        err.write(f"error: {failed} of {len(results)} images could not be captioned (see above)\n")
        return 1
    return 0


def _relabel(result: Any, model: str) -> Any:
    from dataclasses import replace

    return replace(result, model=model) if result.model != model else result


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    except OSError as exc:
        raise BadInputError(f"Cannot write {path}: {exc.strerror}.") from exc
