"""``python -m blip_app bench``: the README's usual loop and blip_app, paired A B A B in one process.

* **baseline (A)** — exactly the usual loop of the transformers documentation and the README: ``AutoProcessor``
  + ``AutoModelForImageTextToText.from_pretrained`` (bfloat16 on a CPU, the weights memory-mapped as it
  leaves them, the same threads), then for every request ``processor(images=..., text=...)`` and
  ``model.generate`` on the whole prompt: the image is encoded again and a chat's whole history is read
  again on every turn; requests queue one at a time, as in a demo with the default queue.
* **blip_app (B)** — :class:`blip_app.tasks.service.Service` (manager, engine, feature cache, prefix cache,
  batching) with each ``--quantization`` in turn (``none``, ``int8-weight-only``, ``int4-weight-only`` by
  default) and what the engine applies at load.

For each quantization, ``--pairs`` pairs (A B A B ...), and each figure is reported as the per-pair ratio
(median, min, max) so that the host's drift, which moves single timings by tens of percent, cancels.
When both models fit ``--memory-gb`` together, each measurement of a pair runs on the baseline and at
once on blip_app with the same image (:func:`_interleaved`): a greedy 20-token caption of a new image
(streamed: time to first token and decode seconds per token), a caption of the image just seen, a
five-turn chat (10-token answers) on a new image, turn by turn. Otherwise each side runs these as a
block and the other side is freed between blocks (its load is then repeated, and timed). blip_app's
side adds 4 concurrent captions of 4 new images and of one new image (the baseline's queue runs 4
requests one after the other: 4 x its new-image caption of the same pair), one request alone, and the
vision encoder alone on one and on 4 images (the floor under 4 concurrent images). Generation lengths
are forced (``min_new_tokens``), since random weights stop anywhere.

Besides: the memory bandwidth measured next to every pair (the decode floor: weight bytes a step reads
/ bandwidth), start-up times (:func:`measure_loads`: each method's first start, which quantizes, then
``--load-pairs`` rounds of a bfloat16 start and a warm start of each method, each in a new process),
resident memory, and per quantization the relative error of each quantized layer's output against
float32 (measured while quantizing, kept in the cache's metadata).

``--model`` takes a catalog name (a random-weight checkpoint at its real size is built once with
:mod:`blip_app.devtools.realsize`, unless the real one is in the Hugging Face cache or ``--real``), a
checkpoint folder, or a hub id. ``--device cuda`` works too (timings synchronise the device).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CAPTION_TOKENS = 20
ANSWER_TOKENS = 10
CHAT_QUESTIONS = (
    "What is in the picture?",
    "What colour is the largest object?",
    "Where could this photo have been taken?",
    "How many people can you see?",
    "What is the weather like?",
)
GB = 1e9
DEFAULT_QUANTIZATIONS = ("none", "int8-weight-only", "int4-weight-only")

# What every quantization's section of the JSON carries (tests check them all).
REQUIRED_METRICS = (
    "load_cold_s", "load_warm_s", "rss_gb", "model_rss_gb", "decode_bytes", "layer_errors", "applied",
    "pairs", "ratios.caption_new", "ratios.caption_known", "ratios.decode_s_per_token", "ratios.ttft",
    "ratios.chat_turn_1", "ratios.chat_turn_5", "four_different_x_one", "four_same_x_one",
    "decode_x_floor", "baseline_decode_x_floor",
)


# --------------------------------------------------------------------------------------------------
# Arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` command's options."""
    parser.add_argument("--model", default="blip2-opt-2.7b",
                        help="catalog name (random weights at its real size unless the real checkpoint is cached "
                             "or --real), checkpoint folder, or hub id (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--quantization", default=",".join(DEFAULT_QUANTIZATIONS),
                        help="blip_app's side, comma-separated, each measured against the baseline in its own pairs "
                             "(none, int8-weight-only, int4-weight-only, int8-cpu, 8bit, 4bit; default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=3, help="A B rounds per quantization (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="2 pairs, shorter generations (a rough, faster run)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="also write the tables as Markdown here")
    parser.add_argument("--real", action="store_true",
                        help="with a catalog name: load the real checkpoint (cache or download), never random weights")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    parser.add_argument("--memory-gb", type=float, default=14 * 1.074,
                        help="keep both sides loaded only if their weights fit in this (default: 14 GiB)")
    parser.add_argument("--no-speed", action="store_true", help="blip_app's side with --no-cpu-speedups")
    parser.add_argument("--static-cache", action="store_true",
                        help="blip_app's side with the static key/value cache and compiled decode step (GPU fast path)")
    parser.add_argument("--realsize-dir", default=None, help="where random-weight checkpoints are cached")
    parser.add_argument("--quantized-cache-dir", default=None,
                        help="the quantized-weights cache to use (default: a fresh one for this run, so that the "
                             "cold load quantizes and the warm one reads it)")
    parser.add_argument("--load-pairs", type=int, default=3,
                        help="rounds of a bfloat16 start then a warm start of each weight-only method, for the "
                             "start-up ratios (0: one cold and one warm start per method, unpaired; "
                             "default: %(default)s)")
    parser.add_argument("--bandwidth-gb", type=float, default=1.0, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------------------------------
# Small measuring tools


class _Clock:
    """Wall-clock timer that waits for the GPU when there is one."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        started = time.perf_counter()
        value = fn()
        self.sync()
        return time.perf_counter() - started, value


def _proc_status(field: str) -> float:
    """A /proc/self/status memory field in GB (0 where unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / GB
    except (OSError, ValueError):
        pass
    return 0.0


def _rss_gb() -> float:
    value = _proc_status("VmRSS")
    if value:
        return value
    import psutil

    return psutil.Process().memory_info().rss / GB


def _peak_rss_gb() -> float:
    value = _proc_status("VmHWM")
    if value:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _cuda_peak_gb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / GB


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        from blip_app.models import speed

        speed.release_free_memory()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _image(index: int, size: tuple[int, int] = (320, 240)) -> Any:
    """A distinct synthetic photo-like image per index (smooth colour fields plus noise), deterministic."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1000 + index)
    height, width = size[1], size[0]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        channels.append(127 + 100 * np.sin(x * fx + y * fy + phase))
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


class _Images:
    """Hands out images never used before in this run (so no cache can know them)."""

    def __init__(self) -> None:
        self._next = 0

    def fresh(self) -> Any:
        self._next += 1
        return _image(self._next)


class _TokenTimes:
    """A ``generate`` streamer recording when the prompt (first call) and each new token arrive."""

    def __init__(self, sync: Callable[[], None] = lambda: None) -> None:
        self.sync = sync
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _concurrently(fns: Sequence[Callable[[], Any]]) -> tuple[float, list[Any]]:
    """Start ``fns`` in threads at the same moment; return the wall time until the last one ends."""
    barrier = threading.Barrier(len(fns) + 1)
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed, results


# --------------------------------------------------------------------------------------------------
# Which checkpoint


def resolve_source(args: argparse.Namespace) -> tuple[str, str]:
    """(source handed to from_pretrained, how it was chosen) for ``--model``."""
    from blip_app.core.catalog import find_entry

    text = args.model
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        return str(path.resolve()), "checkpoint folder"
    entry = find_entry(text)
    if entry is None:
        return text, "hub id"
    if args.real:
        return entry.hub_id, "real checkpoint (hub)"
    from blip_app.models.loading import is_cached

    with contextlib.suppress(Exception):
        if is_cached(entry.hub_id):
            return entry.hub_id, "real checkpoint (Hugging Face cache)"
    from blip_app.devtools.realsize import build_realsize

    folder = build_realsize(entry, root=args.realsize_dir)
    return str(folder), f"random weights at the real size of {entry.name} (blip_app.devtools.realsize)"




def _environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    env = {"threads": torch.get_num_threads(), "device": device, "torch": torch.__version__,
           "transformers": transformers.__version__, "cpu": cpu, "cpu_count": os.cpu_count(),
           "python": platform.python_version()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(Exception):
        from blip_app.models import speed

        env["thp_mode"] = speed.thp_mode()
        env["torch_huge_pages"] = speed.huge_pages_enabled()
    with contextlib.suppress(OSError):
        env["load_average_start"] = list(os.getloadavg())
    return env




# --------------------------------------------------------------------------------------------------
# The two sides


def _caption_text(style: Any) -> str | None:
    from blip_app.core import prompts

    return prompts.caption_prompt(style).text or None


class Baseline:
    """The README's usual loop: processor + ``model.generate`` on the whole prompt, one request at a time."""

    label = "baseline"

    def __init__(self, source: str, device: str, dtype: Any, style: Any, tokens: dict[str, int]) -> None:
        self.source, self.device, self.dtype, self.style, self.tokens = source, device, dtype, style, tokens
        self.model: Any = None
        self.processor: Any = None
        self.clock = _Clock(device)
        self.loads: list[float] = []

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> float:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        seconds, (processor, model) = self.clock(lambda: (
            AutoProcessor.from_pretrained(self.source),
            AutoModelForImageTextToText.from_pretrained(self.source, dtype=self.dtype,
                                                        device_map={"": self.device}).eval()))
        self.processor, self.model = processor, model
        self.loads.append(seconds)
        return seconds

    def free(self) -> None:
        self.model = self.processor = None
        _release_memory()

    def decode_bytes(self) -> int:
        from blip_app.devtools.speed import decode_bytes

        return decode_bytes(self.model)

    def _generate(self, image: Any, text: str | None, new_tokens: int, streamer: Any = None) -> list[int]:
        import torch

        inputs = self.processor(images=image, text=text, return_tensors="pt") if text else \
            self.processor(images=image, return_tensors="pt")
        inputs = inputs.to(self.device, self.dtype)
        kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        if streamer is not None:
            kwargs["streamer"] = streamer
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        ids = output[0].tolist()
        return ids[-new_tokens:] if self.model.config.use_decoder_only_language_model else ids

    def caption(self, image: Any) -> dict[str, float]:
        """A streamed caption: total, time to first token, median seconds between tokens."""
        timer = _TokenTimes(self.clock.sync)
        self.clock.sync()
        started = time.perf_counter()
        self._generate(image, _caption_text(self.style), self.tokens["caption"], streamer=timer)
        self.clock.sync()
        seconds = time.perf_counter() - started
        # The streamer's first call carries the prompt, then one call per new token.
        steps = [b - a for a, b in zip(timer.times[1:], timer.times[2:])]
        return {"s": seconds, "ttft_s": timer.times[1] - started if len(timer.times) > 1 else math.nan,
                "step_s": _median(steps)}

    def caption_plain(self, image: Any) -> float:
        return self.clock(lambda: self._generate(image, _caption_text(self.style), self.tokens["caption"]))[0]

    def chat(self, image: Any) -> Iterator[float]:
        """The five turns' seconds, one turn per step (a generator: two sides can alternate turn by turn)."""
        from blip_app.core import prompts

        history: list[prompts.Turn] = []
        for message in CHAT_QUESTIONS:
            text = prompts.chat_prompt(self.style, history, message).text
            seconds, ids = self.clock(lambda text=text: self._generate(image, text, self.tokens["answer"]))
            answer = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
            history.append(prompts.Turn(message, answer or "yes"))
            yield seconds


class App:
    """blip_app's path through :class:`blip_app.tasks.service.Service` with one quantization."""

    def __init__(self, source: str, options: Any, tokens: dict[str, int]) -> None:
        self.source, self.options, self.tokens = source, options, tokens
        self.label = options.quantization if options.quantization != "none" else "blip_app"
        self.service: Any = None
        self.loads: list[float] = []
        self.clock = _Clock("cpu")

    @property
    def loaded(self) -> bool:
        return self.service is not None

    @property
    def engine(self) -> Any:
        return self.service.manager.get(self.source)

    def load(self) -> float:
        from blip_app.tasks.service import Service

        started = time.perf_counter()
        self.service = Service([self.source], self.options, time_limit_s=None)
        self.service.load(self.source)
        seconds = time.perf_counter() - started
        self.clock = _Clock(self.engine.plan.device)
        self.loads.append(seconds)
        return seconds

    def free(self) -> None:
        if self.service is not None:
            self.service.manager.close()
        self.service = None
        _release_memory()

    def decode_bytes(self) -> int:
        from blip_app.devtools.speed import decode_bytes

        return decode_bytes(self.engine.model)

    def _caption(self, image: Any, tokens: int) -> Any:
        from blip_app.core.settings import Preset

        overrides = {"max_new_tokens": tokens, "min_new_tokens": tokens}
        return self.service.caption(self.source, image, preset=Preset.FAST.value, overrides=overrides)

    def caption(self, image: Any) -> dict[str, float]:
        """A streamed caption of a new image: total and time to first token; decode s/token from a known image
        (a 1-token and a (1 + n)-token caption, the difference over n: no text decoding in the way)."""
        from blip_app.core.settings import Preset, Task

        request = self.service.request(Task.CAPTION, preset=Preset.FAST.value,
                                       overrides={"max_new_tokens": self.tokens["caption"],
                                                  "min_new_tokens": self.tokens["caption"]})
        self.clock.sync()
        started = time.perf_counter()
        first = math.nan
        for _reply in self.service.stream(self.source, image, request):
            if math.isnan(first):
                first = time.perf_counter() - started
        self.clock.sync()
        total = time.perf_counter() - started
        one = self.clock(lambda: self._caption(image, 1))[0]
        many = self.clock(lambda: self._caption(image, 1 + self.tokens["decode"]))[0]
        return {"s": total, "ttft_s": first, "step_s": max(many - one, 0.0) / self.tokens["decode"]}

    def caption_plain(self, image: Any) -> float:
        return self.clock(lambda: self._caption(image, self.tokens["caption"]))[0]

    def chat(self, image: Any) -> Iterator[float]:
        """As :meth:`Baseline.chat`; each turn's input tokens (image and text) and how many of them were reused
        are kept in ``self.turns``."""
        from blip_app.core.settings import Preset

        history: list[tuple[str, str]] = []
        overrides = {"max_new_tokens": self.tokens["answer"], "min_new_tokens": self.tokens["answer"]}
        self.turns: list[dict[str, int]] = []
        for message in CHAT_QUESTIONS:
            seconds, reply = self.clock(lambda message=message: self.service.chat(
                self.source, image, history, message, preset=Preset.FAST.value, overrides=overrides))
            history.append((message, reply.text or "yes"))
            # reused_tokens counts the image's query tokens too (they open the language model's input)
            self.turns.append({"prompt_tokens": reply.prompt_tokens + reply.image_tokens,
                               "reused_tokens": reply.reused_tokens})
            yield seconds

    def vision(self, images: Sequence[Any]) -> float:
        """Seconds of the vision encoder alone on ``images`` in one pass (what the engine runs for a batch)."""
        import torch

        engine = self.engine
        pixels = torch.cat([engine.pixel_values(image) for image in images])
        with torch.inference_mode():
            return self.clock(lambda: engine.model.vision_model(pixel_values=pixels, return_dict=True))[0]

    def four(self, images: Sequence[Any]) -> tuple[float, list[int]]:
        seconds, replies = _concurrently([lambda im=im: self._caption(im, self.tokens["caption"]) for im in images])
        return seconds, [r.batch_size for r in replies]


# --------------------------------------------------------------------------------------------------
# Pairs


def _spread(values: Sequence[float]) -> dict[str, float]:
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean), "n": len(clean)}


def _block(side: Any, images: _Images) -> dict[str, Any]:
    """One side's measurements in a row (when the two sides do not fit in memory together)."""
    new = images.fresh()
    caption = side.caption(new)
    known = side.caption_plain(new)  # the same image again
    chat = list(side.chat(images.fresh()))
    return _figures(caption, known, chat)


def _figures(caption: dict[str, float], known: float, chat: list[float]) -> dict[str, Any]:
    return {"caption_new_s": caption["s"], "ttft_s": caption["ttft_s"], "decode_s_per_token": caption["step_s"],
            "caption_known_s": known, "chat_turns_s": chat}


def _interleaved(baseline: Baseline, app: App, images: _Images) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both sides' measurements, each one taken on the baseline and at once on blip_app with the same image
    (caption, known caption, then the chat turn by turn): the two timings of a ratio are seconds apart, so
    that the host's drift from minute to minute, which a block of a minute per side lets in, cancels."""
    new = images.fresh()
    caption = (baseline.caption(new), app.caption(new))
    known = (baseline.caption_plain(new), app.caption_plain(new))
    picture = images.fresh()
    turns: tuple[list[float], list[float]] = ([], [])
    for base_turn, app_turn in zip(baseline.chat(picture), app.chat(picture)):
        turns[0].append(base_turn)
        turns[1].append(app_turn)
    return _figures(caption[0], known[0], turns[0]), _figures(caption[1], known[1], turns[1])


def _layer_errors(report: Any) -> dict[str, Any] | None:
    """Per kind of layer (the last part of its name: fc1, q_proj, lm_head...): median and max error."""
    if report is None:
        return None
    kinds: dict[str, list[float]] = {}
    for name, error in report.errors.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(error)
    return {"all": report.error_summary(), "by_kind": {k: _spread(v) for k, v in sorted(kinds.items())},
            "skipped": report.skipped, "method": report.method, "group_size": report.group_size}


def _bf16_rounding_error(app: App) -> float | None:
    """The same measurement for the unquantized model: bfloat16's own error on a few of its layers."""
    import torch
    from torch import nn

    from blip_app.models import quantize

    errors = []
    for module in app.engine.model.language_model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 and len(errors) < 8:
            errors.append(quantize.relative_error(module, module))
    return statistics.median(errors) if errors else None


def _options(quantization: str, args: argparse.Namespace, cache_dir: str) -> Any:
    from blip_app.core.devices import LoadOptions

    return LoadOptions(device=args.device, precision=args.precision, quantization=quantization,
                       cpu_speedups=not args.no_speed, quantized_cache_dir=cache_dir,
                       static_cache=bool(getattr(args, "static_cache", False)))


# A start in a process of its own: the imports a quantized start adds (torchao: about 2 s here) count.
_START = """
import time
started = time.perf_counter()
import json, sys
import torch
from blip_app.devtools.bench import App, _options
from blip_app.models import quantize
args, source, cache_dir, threads = json.loads(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
import argparse
app = App(source, _options(args["quantization"], argparse.Namespace(**args), cache_dir), {})
load = app.load()
report = quantize.report_of(app.engine.model)
print(json.dumps({"start_s": time.perf_counter() - started, "load_s": load,
                  "from_cache": bool(report is not None and report.from_cache)}))
"""


def _start_in_new_process(quantization: str, args: argparse.Namespace, source: str, cache_dir: str
                          ) -> dict[str, Any]:
    """Seconds from a new Python process's first line to the model served (imports included), and of the
    load alone, with the quantized cache's use."""
    import subprocess
    import sys

    settings = {"quantization": quantization, "device": args.device, "precision": args.precision,
                "no_speed": args.no_speed, "static_cache": bool(getattr(args, "static_cache", False))}
    import blip_app

    env = dict(os.environ)  # this blip_app, wherever the bench was started from
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(blip_app.__file__).resolve().parent.parent),
                                                      env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _START, json.dumps([settings, source, cache_dir, args.threads])],
                          capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"a {quantization} start in a new process failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_loads(quantizations: Sequence[str], args: argparse.Namespace, source: str, tokens: dict[str, int],
                  cache_dir: str) -> dict[str, Any]:
    """Start-up times, paired: each weight-only method's first start (it quantizes and fills the cache), then
    ``--load-pairs`` rounds of a bfloat16 start followed at once by a warm start of each method (from the
    cache), each in a new process and timed from its first line, imports included, each ratio taken within
    its round. Nothing else is in memory meanwhile."""
    from blip_app.models import quantize

    methods = [q for q in quantizations if q in quantize.METHODS]
    out: dict[str, Any] = {"cold_s": {}, "quantize_s": {}, "rounds": []}
    for method in methods:
        app = App(source, _options(method, args, cache_dir), tokens)
        out["cold_s"][method] = app.load()
        report = quantize.report_of(app.engine.model)
        out["quantize_s"][method] = report.seconds if report is not None and not report.from_cache else None
        app.free()
    for _ in range(args.load_pairs if methods else 0):
        row: dict[str, Any] = {}
        for name in ("none", *methods):
            start = _start_in_new_process(name, args, source, cache_dir)
            row[name], row[f"{name}_load_only"] = start["start_s"], start["load_s"]
            if name != "none":
                row[f"{name}_from_cache"] = start["from_cache"]
        out["rounds"].append(row)
        log.info("load round: %s", row)
    out["warm_x_bf16"] = {m: _spread([r[m] / r["none"] for r in out["rounds"]]) for m in methods}
    out["bf16_s"] = _spread([r["none"] for r in out["rounds"]])
    return out


def run_quantization(quantization: str, baseline: Baseline | None, args: argparse.Namespace, source: str,
                     images: _Images, tokens: dict[str, int], cache_dir: str, bf16_load: list[float],
                     weights_gb: float, loads: dict[str, Any] | None = None) -> dict[str, Any]:
    """One quantization's pairs against the baseline; both sides kept in memory when they fit."""
    from blip_app.core.catalog import BYTES_PER_PARAM
    from blip_app.devtools import speed as speed_tools
    from blip_app.models import quantize, speed

    app = App(source, _options(quantization, args, cache_dir), tokens)
    app_gb = weights_gb * BYTES_PER_PARAM.get(quantization, 2.0) / 2.0
    fits = baseline is None or weights_gb + app_gb <= args.memory_gb
    out: dict[str, Any] = {"quantization": quantization, "both_in_memory": fits,
                           "app_weights_estimate_gb": app_gb}
    if baseline is not None and baseline.loaded and not fits:
        baseline.free()
    rss_before = _rss_gb()
    out["load_cold_s"] = app.load()
    out["model_rss_gb"] = _rss_gb() - rss_before
    report = quantize.report_of(app.engine.model)
    out["quantize_s"] = report.seconds if report is not None else None
    paired = (loads or {}).get("warm_x_bf16", {}).get(quantization)
    if paired and paired.get("n"):  # the start-up times were measured in pairs before (measure_loads)
        rounds = loads["rounds"]
        out["load_cold_s"] = loads["cold_s"][quantization]
        out["quantize_s"] = loads["quantize_s"][quantization]
        out["load_warm_s"] = statistics.median(r[quantization] for r in rounds)
        out["warm_from_cache"] = all(r[f"{quantization}_from_cache"] for r in rounds)
        out["warm_x_bf16_load"] = paired
    elif quantization in quantize.METHODS:  # a second start reads the quantized cache
        app.free()
        out["load_warm_s"] = app.load()
        out["warm_from_cache"] = bool(quantize.report_of(app.engine.model).from_cache)
    else:
        out["load_warm_s"] = out["load_cold_s"]
    if quantization == "none":
        bf16_load.append(out["load_warm_s"])
    out["applied"] = list(speed.applied(app.engine.model))
    out["decode_bytes"] = app.decode_bytes()
    out["layer_errors"] = _layer_errors(quantize.report_of(app.engine.model))
    if quantization == "none":
        out["bf16_layer_error"] = _bf16_rounding_error(app)
    app.caption_plain(images.fresh())  # warm-up: lazy initialisations
    pairs = []
    for index in range(args.pairs):
        pair: dict[str, Any] = {"index": index}
        bandwidth = speed_tools.measure_bandwidth(gigabytes=args.bandwidth_gb, repeats=2)["best"]
        pair["bandwidth_gbs"] = bandwidth
        if baseline is not None:
            if not baseline.loaded:
                if not fits:
                    app.free()
                pair["baseline_load_s"] = baseline.load()
                baseline.caption_plain(images.fresh())  # first touch of the memory-mapped weights
            if fits:
                pair["baseline"], pair["app"] = _interleaved(baseline, app, images)
            else:
                pair["baseline"] = _block(baseline, images)
            pair["baseline_decode_bytes"] = baseline.decode_bytes()
            if not fits:
                baseline.free()
        if not app.loaded:
            pair["app_load_s"] = app.load()
            app.caption_plain(images.fresh())
        if "app" not in pair:
            pair["app"] = _block(app, images)
        pair["app"]["chat_tokens"] = app.turns
        pair["app"]["vision_one_s"] = app.vision([images.fresh()])
        pair["app"]["vision_four_s"] = app.vision([images.fresh() for _ in range(4)])
        pair["app"]["four_different_s"], pair["app"]["four_different_batches"] = app.four(
            [images.fresh() for _ in range(4)])
        same = images.fresh()
        pair["app"]["four_same_s"], pair["app"]["four_same_batches"] = app.four([same] * 4)
        pair["app"]["one_request_s"] = app.caption_plain(images.fresh())
        pair["bandwidth_after_gbs"] = speed_tools.measure_bandwidth(gigabytes=args.bandwidth_gb, repeats=2)["best"]
        pairs.append(pair)
        log.info("%s pair %d: %s", quantization, index, json.dumps(json_safe(pair))[:400])
    out["pairs"] = pairs
    out["rss_gb"] = _rss_gb()
    out["peak_rss_gb"] = _peak_rss_gb()
    out["cuda_peak_gb"] = _cuda_peak_gb(app.engine.plan.device)
    _summarise(out, baseline is not None)
    app.free()
    return out


def _summarise(out: dict[str, Any], with_baseline: bool) -> None:
    """Per-pair ratios (baseline / blip_app: > 1 means blip_app is faster) with median, min and max."""
    pairs = out["pairs"]

    def ratio(key: str, pick: Callable[[dict[str, Any]], float]) -> None:
        if with_baseline:
            out["ratios"][key] = _spread([pick(p["baseline"]) / pick(p["app"]) for p in pairs
                                          if pick(p["app"]) > 0])
        out["app"][key] = _spread([pick(p["app"]) for p in pairs])
        if with_baseline:
            out["baseline"][key] = _spread([pick(p["baseline"]) for p in pairs])

    out["ratios"], out["app"], out["baseline"] = {}, {}, {}
    ratio("caption_new", lambda b: b["caption_new_s"])
    ratio("caption_known", lambda b: b["caption_known_s"])
    ratio("decode_s_per_token", lambda b: b["decode_s_per_token"])
    ratio("ttft", lambda b: b["ttft_s"])
    for turn in range(5):
        ratio(f"chat_turn_{turn + 1}", lambda b, turn=turn: b["chat_turns_s"][turn])
    floors = [out["decode_bytes"] / (min(p["bandwidth_gbs"], p["bandwidth_after_gbs"]) * GB) for p in pairs]
    out["decode_floor_s"] = _spread(floors)
    out["decode_x_floor"] = _spread([p["app"]["decode_s_per_token"] / f for p, f in zip(pairs, floors)])
    out["baseline_decode_x_floor"] = _spread(
        [p["baseline"]["decode_s_per_token"] / (p["baseline_decode_bytes"] / (min(p["bandwidth_gbs"],
                                                                               p["bandwidth_after_gbs"]) * GB))
         for p in pairs]) if with_baseline else None
    out["four_different_x_one"] = _spread([p["app"]["four_different_s"] / p["app"]["one_request_s"] for p in pairs])
    out["four_same_x_one"] = _spread([p["app"]["four_same_s"] / p["app"]["one_request_s"] for p in pairs])
    # What no batching can go below: the vision encoder's own pass over the 4 images, against one request.
    out["vision_four_x_one"] = _spread([p["app"]["vision_four_s"] / p["app"]["one_request_s"] for p in pairs
                                        if "vision_four_s" in p["app"]])
    out["vision_one_x_one"] = _spread([p["app"]["vision_one_s"] / p["app"]["one_request_s"] for p in pairs
                                       if "vision_one_s" in p["app"]])
    last_turns = [p["app"]["chat_tokens"][-1] for p in pairs if p["app"].get("chat_tokens")]
    out["chat_turn_5_tokens"] = {"prompt": _spread([t["prompt_tokens"] for t in last_turns]),
                                 "computed": _spread([t["prompt_tokens"] - t["reused_tokens"] for t in last_turns])}
    if with_baseline:  # the baseline's queue: 4 requests one after the other
        out["ratios"]["four_different"] = _spread([4 * p["baseline"]["caption_new_s"] / p["app"]["four_different_s"]
                                                   for p in pairs])


# --------------------------------------------------------------------------------------------------
# Targets and tables


def build_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets at the real size, each with the paired measurement that decides it."""
    rows: list[dict[str, Any]] = []
    runs = result["runs"]
    bf16_load = result.get("bf16_load_s")

    def add(quantization: str, metric: str, spread: dict[str, float] | None, target: str,
            met: Callable[[dict[str, float]], bool]) -> None:
        if spread is None or not spread.get("n"):
            return
        rows.append({"quantization": quantization, "metric": metric, "median": spread["median"],
                     "min": spread["min"], "max": spread["max"], "target": target, "met": bool(met(spread))})

    for name, run in runs.items():
        ratios = run.get("ratios") or {}
        if name == "int4-weight-only" and ratios:
            add(name, "decode s/token, blip_app / baseline", _invert(ratios.get("decode_s_per_token")),
                "<= 0.35", lambda s: s["median"] <= 0.35)
            add(name, "chat turn 5, speed-up", ratios.get("chat_turn_5"), ">= 4x", lambda s: s["median"] >= 4)
            add(name, "greedy 20-token caption, new image, blip_app / baseline", _invert(ratios.get("caption_new")),
                "<= 0.5", lambda s: s["median"] <= 0.5)
        if name == "none" and ratios:
            add(name, "chat turn 5, speed-up", ratios.get("chat_turn_5"), ">= 1.5x", lambda s: s["median"] >= 1.5)
            for key, spread in ratios.items():
                add(name, f"{key}, speed-up in every pair", spread, "never < 1 (min)", lambda s: s["min"] >= 1.0)
        add(name, "4 concurrent captions of 4 images / one request", run.get("four_different_x_one"), "<= 2x",
            lambda s: s["median"] <= 2.0)
        if name != "none" and run.get("warm_from_cache") and (run.get("warm_x_bf16_load") or bf16_load):
            add(name, "warm start / bfloat16 load",
                run.get("warm_x_bf16_load") or _spread([run["load_warm_s"] / bf16_load]), "<= 1.5x",
                lambda s: s["median"] <= 1.5)
    return rows


def _invert(spread: dict[str, float] | None) -> dict[str, float] | None:
    """A spread of speed-ups as a spread of time ratios (blip_app / baseline)."""
    if spread is None or not spread.get("n"):
        return spread
    return {"median": 1 / spread["median"], "min": 1 / spread["max"], "max": 1 / spread["min"], "n": spread["n"]}


def _fmt(value: Any, unit: str = "s", digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{unit}"


def _cell(spread: dict[str, float] | None, unit: str = "x") -> str:
    if not spread or not spread.get("n"):
        return "-"
    return f"{spread['median']:.2f}{unit} ({spread['min']:.2f}-{spread['max']:.2f})"


def render_table(result: dict[str, Any]) -> str:
    """Markdown: one table per quantization (paired figures), the layer errors, the targets."""
    env = result["environment"]
    lines = [f"Model: {result['model']['source_note']}; {result['model']['weights_gb']:.2f} GB of weights; "
             f"{env['threads']} threads; {env['device']}; load average at start {env.get('load_average_start')}; "
             f"pairs per quantization: {result['pairs']}.", ""]
    for name, run in result["runs"].items():
        base, app, ratios = run.get("baseline") or {}, run["app"], run.get("ratios") or {}
        lines += [f"### {name}", "",
                  f"Applied: {', '.join(run['applied']) or '-'}; both sides in memory: {run['both_in_memory']}; "
                  f"load cold {_fmt(run['load_cold_s'])}, warm {_fmt(run['load_warm_s'])}"
                  + (f" (quantizing {_fmt(run.get('quantize_s'))})" if run.get("quantize_s") else "")
                  + f"; resident {_fmt(run['rss_gb'], ' GB', 2)} (this model {_fmt(run['model_rss_gb'], ' GB', 2)})"
                  f"; a decode step reads {run['decode_bytes'] / GB:.2f} GB.", "",
                  "| metric | baseline (median) | blip_app (median) | speed-up per pair: median (min-max) |",
                  "|---|---|---|---|"]
        names = [("caption_new", "greedy 20-token caption, new image"),
                 ("caption_known", "caption, known image"), ("decode_s_per_token", "decode s/token"),
                 ("ttft", "time to first token, new image")] + [
            (f"chat_turn_{t}", f"chat turn {t} (10-token answer)") for t in range(1, 6)]
        for key, label in names:
            lines.append(f"| {label} | {_fmt((base.get(key) or {}).get('median'))} | "
                         f"{_fmt((app.get(key) or {}).get('median'))} | {_cell(ratios.get(key))} |")
        lines.append(f"| decode x its bandwidth floor | {_cell(run.get('baseline_decode_x_floor'))} | "
                     f"{_cell(run.get('decode_x_floor'))} | floor {_fmt(run['decode_floor_s']['median'])} |")
        lines.append(f"| 4 concurrent captions, 4 images (x one request) | queued: 4 x one | "
                     f"{_cell(run.get('four_different_x_one'))} | {_cell(ratios.get('four_different'))} |")
        lines.append(f"| 4 concurrent captions, one image (x one request) | queued: 4 x one | "
                     f"{_cell(run.get('four_same_x_one'))} | - |")
        lines.append(f"| vision encoder alone, 4 images in one pass (x one request) | - | "
                     f"{_cell(run.get('vision_four_x_one'))} | one image: {_cell(run.get('vision_one_x_one'))} |")
        tokens5 = run.get("chat_turn_5_tokens") or {}
        if (tokens5.get("prompt") or {}).get("n"):
            lines.append(f"| chat turn 5: input tokens (image and text), of them computed (the rest reused) | "
                         f"{tokens5['prompt']['median']:.0f} | {tokens5['computed']['median']:.0f} | - |")
        if run.get("warm_x_bf16_load"):
            lines.append(f"| warm start x a bfloat16 start, paired | - | {_cell(run['warm_x_bf16_load'])} | - |")
        errors = run.get("layer_errors")
        if errors:
            kinds = ", ".join(f"{k} {v['median']:.4f} (max {v['max']:.4f})" for k, v in errors["by_kind"].items())
            lines += ["", f"Layer output error against float32 ({errors['all']['layers']} layers): median "
                          f"{errors['all']['median']:.4f}, max {errors['all']['max']:.4f}; by kind: {kinds}"
                      + (f"; left unquantized: {', '.join(errors['skipped'])}" if errors["skipped"] else "") + "."]
        elif run.get("bf16_layer_error") is not None:
            lines += ["", f"bfloat16's own layer output error against float32: {run['bf16_layer_error']:.4f}."]
        lines.append("")
    if result["targets"]:
        lines += ["### Targets", "", "| quantization | metric | median | min | max | target | met? |",
                  "|---|---|---|---|---|---|---|"]
        for row in result["targets"]:
            lines.append(f"| {row['quantization']} | {row['metric']} | {row['median']:.2f} | {row['min']:.2f} | "
                         f"{row['max']:.2f} | {row['target']} | {'yes' if row['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The run


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """All quantizations' pairs, the tables printed, JSON / Markdown written if asked; return the results."""
    import torch

    from blip_app.core.catalog import kind_from_config
    from blip_app.core.devices import LoadOptions, plan_load
    from blip_app.models.engine import DTYPES
    from blip_app.models.hardware import detect_hardware

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.pairs = min(args.pairs, 2)
        args.load_pairs = min(args.load_pairs, 2)
    args.pairs = max(args.pairs, 1)
    tokens = ({"caption": 6, "answer": 4, "decode": 8} if args.quick
              else {"caption": CAPTION_TOKENS, "answer": ANSWER_TOKENS, "decode": 16})
    quantizations = [q.strip() for q in args.quantization.split(",") if q.strip()]
    source, note = resolve_source(args)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    kind = kind_from_config(config.to_dict(), source)
    plan = plan_load(kind.language_model, LoadOptions(device=args.device, precision=args.precision),
                     detect_hardware())
    weights_gb = _weights_gb(source)
    result: dict[str, Any] = {"environment": _environment(plan.device), "pairs": args.pairs,
                              "model": {"source": source, "source_note": note, "weights_gb": weights_gb},
                              "tokens": tokens, "runs": {}}
    from blip_app.core.catalog import PromptStyle, find_entry

    entry = find_entry(args.model)
    style = entry.prompt_style if entry else (PromptStyle.INSTRUCTBLIP if kind.family.value == "instructblip"
                                              else PromptStyle.BLIP2)
    baseline = Baseline(source, plan.device, DTYPES[plan.dtype], style, tokens)
    images = _Images()
    bf16_load: list[float] = []
    with contextlib.ExitStack() as stack:
        cache_dir = args.quantized_cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="quantized-"))
        loads = measure_loads(quantizations, args, source, tokens, cache_dir) if args.load_pairs > 0 else None
        result["loads"] = loads
        for quantization in quantizations:
            result["runs"][quantization] = run_quantization(quantization, baseline, args, source, images, tokens,
                                                            cache_dir, bf16_load, weights_gb, loads)
            if args.json:  # what is measured so far survives an interrupted run
                Path(args.json).write_text(json.dumps(json_safe(result), indent=1))
        baseline.free()
    result["baseline_loads_s"] = baseline.loads
    result["bf16_load_s"] = statistics.median(bf16_load) if bf16_load else None
    result["targets"] = build_targets(result)
    with contextlib.suppress(OSError):
        result["environment"]["load_average_end"] = list(os.getloadavg())
    table = render_table(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(result), indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return result


def _weights_gb(source: str) -> float:
    path = Path(source)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors")) / GB
    return math.nan


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null (the bench's and gpu-check's reports)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m blip_app.devtools.bench ...`` (the same as ``python -m blip_app bench ...``)."""
    parser = argparse.ArgumentParser(prog="python -m blip_app bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    run_bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
