"""Command line: ``python -m blip_app COMMAND ...`` (``COMMAND --help`` lists its options).

A failure prints one line naming the problem on stderr (no traceback; ``--verbose`` shows it) and
exits non-zero: 2 for bad usage or input, 1 for a model that cannot be loaded or run. Without
``--verbose`` stderr carries only those lines and per-file notes: no progress bars, no library warnings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from blip_app.cli import commands as cli_commands
from blip_app.core.catalog import catalog_entries
from blip_app.core.devices import PRECISIONS, QUANTIZATIONS, LoadOptions
from blip_app.core.settings import SETTING_NAMES, Preset
from blip_app.errors import BadImageError, BadInputError, BlipAppError, SettingsError, UnknownModelError

log = logging.getLogger("blip_app")

DEFAULT_MODEL = os.environ.get("BLIP_APP_DEFAULT_MODEL", "blip2-opt-2.7b")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="catalog name, hub id or checkpoint folder (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                        help="int4-weight-only / int8-weight-only: torchao, faster decode on a CPU or GPU (int4 "
                             "recommended on a CPU); 8bit/4bit: bitsandbytes (GPU memory); int8-cpu: torch dynamic "
                             "int8 (default: none)")
    parser.add_argument("--no-cpu-speedups", action="store_true",
                        help="on a CPU, keep the model exactly as loaded (no resident copy, no packed kernels)")
    parser.add_argument("--offline", action="store_true", help="never download; local cache and folders only")
    parser.add_argument("--preset", choices=[p.value for p in Preset], default=Preset.STANDARD.value)
    for name in SETTING_NAMES:
        kind = {"do_sample": str}.get(name, float if name in ("temperature", "top_p", "repetition_penalty",
                                                             "length_penalty") else int)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                            help=argparse.SUPPRESS if name == "seed" else None)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m blip_app`` parser."""
    parser = argparse.ArgumentParser(prog="python -m blip_app",
                                     description="Caption, question, score and search images with BLIP-2 and "
                                                 "InstructBLIP models. Every command is listed below; "
                                                 "COMMAND --help lists its options.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress and show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    caption = commands.add_parser("caption", help="caption images, folders (recursive) and zip archives")
    caption.add_argument("images", nargs="+", metavar="IMAGE_FOLDER_OR_ZIP")
    caption.add_argument("--json", action="store_true", help="one JSON object per line: image, model, caption")
    caption.add_argument("--detailed", action="store_true", help="a longer description")
    _add_model_options(caption)
    cli_commands.add_caption_batch_options(caption)

    ask = commands.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", metavar="IMAGE")
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument("--short", action="store_true", help="ask for a short answer")
    ask.add_argument("--json", action="store_true", help="print a JSON object: image, model, question, answer")
    _add_model_options(ask)

    cli_commands.add_embed_parser(commands)
    cli_commands.add_trust_parsers(commands)

    models = commands.add_parser("models", help="list the catalog")
    models.add_argument("--json", action="store_true")

    bench = commands.add_parser("bench", help="measure blip_app's path against the naive baseline at a real size")
    from blip_app.devtools import bench as bench_module

    bench_module.add_arguments(bench)

    # Its own parser (app.py's options plus the cluster's): blip_app.serving.ray_serve, which needs Ray.
    commands.add_parser("serve-ray", add_help=False, prefix_chars="\0",
                        help="serve the app through Ray Serve on one machine or a cluster (requirements-ray.txt)")

    tiny = commands.add_parser("make-tiny", help="write tiny random checkpoints of all four families (offline)")
    tiny.add_argument("directory", metavar="DIR")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _session(args: argparse.Namespace):
    from blip_app.tasks.service import Service

    options = LoadOptions(device=args.device, precision=args.precision, quantization=args.quantization,
                          local_files_only=args.offline or os.environ.get("HF_HUB_OFFLINE") == "1",
                          cpu_speedups=not args.no_cpu_speedups)
    return Service([args.model], options)


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer one question about one image."""
    from blip_app.core.images import load_image

    image = load_image(args.image)
    service = _session(args)
    reply = service.answer(args.model, image, args.question, preset=Preset(args.preset),
                           overrides=cli_commands.overrides(args), short=args.short)
    if args.json:
        print(json.dumps({"image": args.image, "model": args.model, "question": args.question,
                          "answer": reply.text}, ensure_ascii=False))
    else:
        print(reply.text)
    if not reply.text.strip():
        print(cli_commands.EMPTY_ANSWER, file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Print the catalog: the captioning models, then the image-text matching model (trust scores, search)."""
    from blip_app.models.retrieval import RETRIEVAL_CATALOG

    rows = []
    for entry in catalog_entries():
        rows.append({
            "name": entry.name, "hub_id": entry.hub_id, "family": entry.family.value,
            "language_model": entry.language_model.value, "prompt_style": entry.prompt_style.value,
            "context_tokens": entry.context_tokens, "gpu_dtype": entry.language_model.gpu_dtype,
            "memory_gb": {p: entry.memory_gb(p) for p in ("bfloat16", "8bit", "4bit")},
            "description": entry.description,
        })
    for matching in RETRIEVAL_CATALOG.values():  # no language model: no context, no 8/4-bit loading
        rows.append({
            "name": matching.name, "hub_id": matching.hub_id, "family": matching.family.value,
            "language_model": None, "prompt_style": None, "context_tokens": None, "gpu_dtype": "float16",
            "memory_gb": {"bfloat16": matching.memory_gb("bfloat16"), "8bit": None, "4bit": None},
            "description": matching.description,
        })
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = f"{'name':26} {'family':13} {'LM':8} {'context':>7} {'GPU dtype':9} {'GB 16-bit/8-bit/4-bit':>21}"
    print(header)
    for row in rows:
        memory = " / ".join(f"{row['memory_gb'][p]:>4}" if row["memory_gb"][p] is not None else "   -"
                            for p in ("bfloat16", "8bit", "4bit"))
        print(f"{row['name']:26} {row['family']:13} {row['language_model'] or '-':8} "
              f"{row['context_tokens'] or '-':>7} {row['gpu_dtype']:9} {memory:>21}")
    print("\nblip2-itm-vit-g is the image-text matching model behind trust scores and search (trust, search, embed; "
          "the app's --trust-model): it cannot caption.")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    """Write the tiny offline checkpoints."""
    from blip_app.devtools.tiny import make_tiny_checkpoints, make_tiny_retrieval_checkpoint

    paths = make_tiny_checkpoints(args.directory, seed=args.seed)
    paths["retrieval"] = make_tiny_retrieval_checkpoint(os.path.join(args.directory, "retrieval"), seed=args.seed)
    for family, path in paths.items():
        print(f"{family}: {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark (see blip_app/bench.py)."""
    from blip_app.devtools.bench import run_bench

    run_bench(args)
    return 0


COMMANDS = {"bench": cmd_bench, "caption": cli_commands.cmd_caption, "ask": cmd_ask, "embed": cli_commands.cmd_embed,
            "models": cmd_models, "make-tiny": cmd_make_tiny, "trust": cli_commands.cmd_trust,
            "search": cli_commands.cmd_search}

# Errors caused by what the user typed or gave exit 2; errors of the model or machine exit 1.
_USAGE_ERRORS = (BadImageError, BadInputError, SettingsError, UnknownModelError)


def _quiet_libraries() -> None:
    """No progress bars or library warnings on stderr (set before torch and transformers are imported:
    they read these once, at import)."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the hub's downloads and transformers' own bars
    os.environ.setdefault("TORCH_LOGS", "-all")  # torch's import-time notices
    warnings.simplefilter("ignore")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    verbose = any(argument in ("--verbose", "-v") for argument in arguments)
    if not verbose:
        _quiet_libraries()
    if arguments[:1] == ["serve-ray"]:
        return _serve_ray(arguments[1:])
    args = build_parser().parse_args(arguments)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except BlipAppError as exc:
        if args.verbose:
            log.exception("failed")
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, _USAGE_ERRORS) else 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback, unless --verbose
        if args.verbose:
            log.exception("failed")
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        print(f"error: unexpected failure ({type(exc).__name__}: {first_line}); run with --verbose for details",
              file=sys.stderr)
        return 1


def _serve_ray(argv: Sequence[str]) -> int:
    """``serve-ray``: its flags are parsed by blip_app.serving.ray_serve; without Ray installed, one line says how."""
    try:
        from blip_app.serving import ray_serve
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "ray":
            raise
        print("error: serve-ray needs Ray Serve: pip install -r requirements-ray.txt", file=sys.stderr)
        return 2
    try:
        return ray_serve.main(argv)
    except BlipAppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, _USAGE_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
