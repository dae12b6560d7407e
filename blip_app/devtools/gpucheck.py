"""``bash scripts/gpu-check.sh``: what must hold on a machine with one CUDA GPU, in one run, one report.

On a GPU (no network needed): builds blip2-opt-2.7b and instructblip-flan-t5-xl with random weights at
their real sizes (:mod:`blip_app.devtools.realsize`), runs the paired bench (:mod:`blip_app.devtools.bench`)
on each for the GPU's own precision (float16 for OPT, bfloat16 for Flan-T5), bitsandbytes 8-bit and
4-bit, torchao int8 and int4 weight-only, and the static-cache path (compiled decode step); then checks
that switching between the two models parks the idle one in CPU memory and brings it back with the same
tokens, and that the GPU memory returns after the switches and when everything is freed. Everything has
to fit ``--time-limit`` (8 minutes). Writes ``gpu-check.json`` and ``gpu-check.md`` in ``--out``.

``--reduced`` runs the same steps on tiny versions of the two checkpoints (the real architectures
shrunk 64 times) on the CPU when there is no GPU, with the modes a CPU can run (no bitsandbytes 4-bit):
the tests run it, so the script is known to work before a GPU is at hand. A failed step is recorded
with its error and the run goes on; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINTS = ("blip2-opt-2.7b", "instructblip-flan-t5-xl")
GPU_MODES = ("none", "int8-weight-only", "int4-weight-only", "8bit", "4bit")
CPU_MODES = ("none", "int8-weight-only", "int4-weight-only")
REDUCED_SCALE = 1 / 64
TIME_LIMIT_S = 480.0
MEMORY_SLACK = 1.10  # GPU memory may stay this much above where it started (allocator blocks, CUDA context)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_allocated_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 1e9


def _free() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Steps:
    """Runs named steps, recording each one's result or error and its time; never stops at a failure."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        started = time.perf_counter()
        try:
            value = fn()
            ok = bool(value.pop("ok", True))
            self.results.append({"step": name, "ok": ok, "seconds": time.perf_counter() - started, **value})
            return value
        except Exception as exc:  # noqa: BLE001 - recorded, and the next step runs
            log.exception("gpu-check step %s failed", name)
            self.results.append({"step": name, "ok": False, "seconds": time.perf_counter() - started,
                                 "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=6)})
            return None
        finally:
            _free()

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.results)


def _bench(folder: Path, device: str, modes: Sequence[str], reduced: bool, static_cache: bool = False
           ) -> dict[str, Any]:
    from blip_app.devtools import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    # One round of paired start-ups: the 8 minutes of the whole check hold no more.
    argv = ["--model", str(folder), "--device", device, "--quantization", ",".join(modes), "--pairs", "1" if reduced
            else "2", "--load-pairs", "1"]
    if reduced:
        argv += ["--quick", "--bandwidth-gb", "0.05"]
    if static_cache:
        argv.append("--static-cache")
    args = parser.parse_args(argv)
    result = bench.run_bench(args)
    runs = result["runs"]
    summary = {name: {"decode_s_per_token": run["app"]["decode_s_per_token"]["median"],
                      "decode_speedup": (run.get("ratios") or {}).get("decode_s_per_token", {}).get("median"),
                      "chat_turn_5_speedup": (run.get("ratios") or {}).get("chat_turn_5", {}).get("median"),
                      "load_warm_s": run["load_warm_s"], "applied": run["applied"],
                      "cuda_peak_gb": run.get("cuda_peak_gb")}
               for name, run in runs.items()}
    return {"modes": list(modes), "static_cache": static_cache, "summary": summary, "targets": result["targets"],
            "table": bench.render_table(result)}


def _switches(folders: Sequence[Path], device: str) -> dict[str, Any]:
    """Two models, room for one: A, then B (A parked in CPU memory on a GPU, freed on a CPU), then A again
    with the same tokens; GPU memory back near its start after the switches and after freeing all."""
    from PIL import Image

    from blip_app.core.devices import LoadOptions
    from blip_app.core.settings import Preset
    from blip_app.devtools.realsize import parameter_count
    from blip_app.tasks.service import Service

    sizes = [parameter_count(folder) * 2 / 1e9 for folder in folders]
    budget = max(sizes) * 1.3  # either fits, not both
    names = [str(folder) for folder in folders]
    start_gb = _gpu_allocated_gb()
    service = Service(names, LoadOptions(device=device), memory_budget_gb=budget, time_limit_s=None)
    image = Image.new("RGB", (224, 224), (180, 90, 40))
    overrides = {"max_new_tokens": 6, "min_new_tokens": 6}

    def caption(name: str) -> tuple[int, ...]:
        return tuple(service.caption(name, image, preset=Preset.FAST.value, overrides=overrides).token_ids)

    out: dict[str, Any] = {"budget_gb": budget, "sizes_gb": sizes, "gpu_start_gb": start_gb}
    first = caption(names[0])
    out["gpu_with_a_gb"] = _gpu_allocated_gb()
    caption(names[1])
    manager = service.manager
    out["loaded_after_b"] = manager.loaded_names()
    out["a_parked"] = names[0] in manager._parked
    out["gpu_with_b_gb"] = _gpu_allocated_gb()
    started = time.perf_counter()
    again = caption(names[0])
    out["switch_back_s"] = time.perf_counter() - started
    out["same_tokens_after_switching_back"] = again == first
    out["gpu_back_with_a_gb"] = _gpu_allocated_gb()
    service.manager.close()
    _free()
    out["gpu_after_free_gb"] = _gpu_allocated_gb()
    checks = [out["same_tokens_after_switching_back"], names[1] not in manager.loaded_names() or
              names[0] in manager.loaded_names()]
    if device.startswith("cuda"):
        checks.append(out["a_parked"])
        with_a, with_b, back = out["gpu_with_a_gb"], out["gpu_with_b_gb"], out["gpu_back_with_a_gb"]
        checks.append(with_b <= start_gb + sizes[1] * MEMORY_SLACK + 0.5)  # A's weights left the GPU
        checks.append(back <= with_a * MEMORY_SLACK + 0.5)
        checks.append(out["gpu_after_free_gb"] <= start_gb * MEMORY_SLACK + 0.2)
    else:
        out["note"] = "no GPU: parking is not used on a CPU (the idle model is freed); tokens and switches checked"
    out["ok"] = all(checks)
    return out


def render(report: dict[str, Any]) -> str:
    lines = ["# gpu-check", "", f"Device: {report['device']} ({report['environment'].get('gpu') or 'no GPU'}); "
             f"reduced: {report['reduced']}; total {report['seconds']:.0f} s against a limit of "
             f"{report['time_limit_s']:.0f} s; all checks passed: {report['ok']}.", "",
             "| step | ok | seconds | note |", "|---|---|---|---|"]
    for step in report["steps"]:
        note = step.get("error") or ", ".join(f"{k}={v}" for k, v in step.items()
                                               if k in ("a_parked", "same_tokens_after_switching_back", "folder",
                                                        "gpu_after_free_gb", "switch_back_s"))
        lines.append(f"| {step['step']} | {'yes' if step['ok'] else 'NO'} | {step['seconds']:.1f} | {note} |")
    for step in report["steps"]:
        if "table" in step:
            lines += ["", f"## {step['step']}", "", step["table"]]
    return "\n".join(lines) + "\n"


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bash scripts/gpu-check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="tiny sizes (the tests; the CPU when there is no GPU)")
    parser.add_argument("--out", default="gpu-check", help="folder for gpu-check.json and gpu-check.md")
    parser.add_argument("--root", default=None, help="where the random-weight checkpoints are built")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from blip_app.devtools import realsize
    from blip_app.devtools.bench import _environment
    from blip_app.models import quantize

    device = "cuda" if _cuda() else "cpu"
    if device == "cpu" and not args.reduced:
        parser.error("no CUDA GPU here: run with --reduced (tiny sizes on the CPU)")
    modes = GPU_MODES if device == "cuda" else CPU_MODES
    if device == "cuda":
        with_bnb = True
        try:
            import bitsandbytes  # noqa: F401
        except Exception:  # noqa: BLE001
            with_bnb = False
        if not with_bnb:
            modes = CPU_MODES
    steps = Steps()
    folders: dict[str, Path] = {}
    scale = REDUCED_SCALE if args.reduced else 1.0
    for name in CHECKPOINTS:
        def build(name: str = name) -> dict[str, Any]:
            folder = realsize.build_realsize(name, root=args.root, scale=scale)
            folders[name] = Path(folder)
            return {"folder": str(folder), "parameters": realsize.parameter_count(folder)}

        steps.run(f"build {name}", build)
    for name, folder in folders.items():
        steps.run(f"bench {name}", lambda folder=folder: _bench(folder, device, modes, args.reduced))
        steps.run(f"bench {name} static cache",
                  lambda folder=folder: _bench(folder, device, ("none",), args.reduced, static_cache=True))
    if len(folders) == 2:
        steps.run("switches and parking", lambda: _switches(list(folders.values()), device))
    seconds = time.perf_counter() - started
    within = seconds <= args.time_limit
    steps.results.append({"step": "time limit", "ok": within or args.reduced, "seconds": seconds,
                          "within_limit": within})
    report = {"device": device, "reduced": args.reduced, "environment": _environment(device),
              "torchao": quantize.torchao_version(), "modes": list(modes), "time_limit_s": args.time_limit,
              "seconds": seconds, "steps": steps.results, "ok": steps.ok}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from blip_app.devtools.bench import json_safe

    (out / "gpu-check.json").write_text(json.dumps(json_safe(report), indent=1))
    (out / "gpu-check.md").write_text(render(report))
    print(render(report))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return 0 if run(argv)["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
