"""Figures for docs/scaling-out.md: requests served by replica, and the time from a request to a replica
that must load its model against one that holds it.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/ray_figures.py [--pairs 6]

A local Ray cluster (2 CPUs, loopback), two inference replicas keeping one model each, three tiny
checkpoints of three families (blip_app.devtools.tiny). Each pair is a request for a model no replica
holds (the replica loads it, evicting its model) followed at once by a request for the same model
(now held); each pair takes the one model of the three that no replica holds, so its first request is cold.
Timed end to end from the driver through the RemoteManager the ingress uses (validate, describe,
prepare, generate: 8 new tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()

    import ray
    from PIL import Image
    from ray import serve

    from blip_app.devtools.tiny import make_tiny_checkpoint
    from blip_app.serving.ray_serve import APP_NAME, INFERENCE, deploy, parse_args
    from blip_app.serving.remote import RemoteManager
    from blip_app.tasks.service import Service

    folder = Path(tempfile.mkdtemp(prefix="ray-figures-"))
    families = ("blip2-opt", "blip2-flan-t5", "instructblip-flan-t5")
    models = [str(make_tiny_checkpoint(folder / family, family)) for family in families]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": env})
    try:
        flags = [flag for model in models for flag in ("--model", model)]
        config, cluster = parse_args([*flags, "--trust-model", "none", "--offline", "--port", "18765",
                                      "--replicas", "2", "--num-cpus", "0.5", "--models-per-replica", "1"])
        deploy(config, cluster)
        manager = RemoteManager(serve.get_deployment_handle(INFERENCE, app_name=APP_NAME), config.offered_models,
                                config.load)
        service = Service(config.offered_models, config.load, limits=config.limits, manager=manager)
        image = Image.new("RGB", (40, 30), (200, 40, 40))
        service.caption(models[0], image, overrides={"max_new_tokens": 8})  # both replicas up, Serve warm
        service.caption(models[1], image, overrides={"max_new_tokens": 8})
        cold, warm = [], []
        for _ in range(args.pairs):
            held = {name for names in manager.replicas().values() for name in names}
            model = next(m for m in models if m not in held)  # two replicas of one model each: one is not held
            for times in (cold, warm):
                started = time.perf_counter()
                service.caption(model, image, overrides={"max_new_tokens": 8})
                times.append(time.perf_counter() - started)
        ratios = [c / w for c, w in zip(cold, warm)]
        by_replica = Counter(replica for (_, replica) in manager.served.elements())
        print(f"pairs: {args.pairs}")
        print(f"must load: median {statistics.median(cold):.3f} s (min {min(cold):.3f}, max {max(cold):.3f})")
        print(f"holds it:  median {statistics.median(warm):.3f} s (min {min(warm):.3f}, max {max(warm):.3f})")
        print(f"ratio load/hold per pair: median {statistics.median(ratios):.1f} "
              f"(min {min(ratios):.1f}, max {max(ratios):.1f})")
        print("requests served by replica:")
        for replica, count in sorted(by_replica.items()):
            per_model = {Path(m).name: n for (m, r), n in manager.served.items() if r == replica}
            print(f"  {replica}: {count} {per_model}")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
