"""blip_app on a real local Ray cluster (Ray Serve): two inference replicas, two tiny models of
different families, the page through gradio_client, and a replica killed during a request.

One cluster for the module (ray.init(num_cpus=2), loopback only, no dashboard): Ray's start-up is
the slow part. The driver talks to the deployments with a RemoteManager of its own, the same class
the ingress uses, so that the tests can see which replica served each request.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is optional: pip install -r requirements-ray.txt")

from _server import free_port, wait_until  # noqa: E402
from PIL import Image  # noqa: E402

from blip_app.core.settings import Task  # noqa: E402
from blip_app.errors import BadInputError, GenerationError, PromptTooLongError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LONG = {"max_new_tokens": 300, "min_new_tokens": 300, "num_beams": 1}  # a few seconds of streaming here


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints: dict[str, Path]):
    """The app deployed on a local cluster: two inference replicas keeping one model each, one ingress."""
    from ray import serve

    from blip_app.serving.ray_serve import APP_NAME, INFERENCE, ClusterOptions, deploy, parse_args
    from blip_app.serving.remote import RemoteManager
    from blip_app.tasks.service import Service

    models = [str(tiny_checkpoints["blip2-opt"]), str(tiny_checkpoints["instructblip-flan-t5"])]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": env})
    try:
        flags = [flag for model in models for flag in ("--model", model)]
        config, options = parse_args([*flags, "--trust-model", "none", "--offline", "--rate-limit", "0",
                                      "--host", "127.0.0.1", "--port", str(free_port()),
                                      "--replicas", "2", "--num-cpus", "0.5", "--models-per-replica", "1"])
        assert options == ClusterOptions(replicas=2, num_cpus=0.5, models_per_replica=1)
        url = deploy(config, options)
        manager = RemoteManager(serve.get_deployment_handle(INFERENCE, app_name=APP_NAME), config.offered_models,
                                config.load)
        service = Service(config.offered_models, config.load, limits=config.limits, manager=manager)
        yield {"url": url, "models": models, "manager": manager, "service": service, "config": config}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.new("RGB", (40, 30), (200, 40, 40))


def _replicas_serving(manager, model: str) -> set[str]:
    return {replica for (name, replica), count in manager.served.items() if name == model and count}


def test_each_model_is_served_by_a_replica_that_holds_it(cluster, image) -> None:
    service, manager, (opt, t5) = cluster["service"], cluster["manager"], cluster["models"]
    for model in (opt, t5, opt, t5, opt, t5):
        reply = service.caption(model, image, overrides={"max_new_tokens": 8})
        assert reply.model == model and reply.finished
    where = {model: _replicas_serving(manager, model) for model in (opt, t5)}
    assert len(where[opt]) == 1 and len(where[t5]) == 1, where
    assert where[opt] != where[t5], "the two models share a replica although each replica keeps one"
    holds = manager.replicas()
    assert holds == {next(iter(where[opt])): (opt,), next(iter(where[t5])): (t5,)}
    states = {state.name: state for state in service.models()}
    assert states[opt].state == "loaded" and "1 of 2 replicas" in states[opt].detail


def test_streaming_and_errors_cross_the_cluster(cluster, image) -> None:
    service, t5 = cluster["service"], cluster["models"][1]
    request = service.request(Task.ANSWER, question="What colour is it?", overrides={"max_new_tokens": 12,
                                                                                    "num_beams": 1})
    replies = list(service.stream(t5, image, request))
    assert [r.finished for r in replies][-1] is True and all(not r.finished for r in replies[:-1])
    assert len(replies) > 1 and replies[-1].new_tokens >= 1
    # The engine's own errors arrive as themselves (the class and its sentence), not as a traceback:
    # raised inside the replica's work (PromptTooLongError) or before it (an option the replica refuses).
    with cluster["manager"].use(cluster["models"][0]) as remote:
        with pytest.raises(PromptTooLongError, match="lower max_new_tokens"):
            remote.prepare(Task.ANSWER, question="What is it?", max_new_tokens=2040)
        prepared = remote.prepare(Task.ANSWER, question="What is it?", max_new_tokens=8)
        with pytest.raises(BadInputError, match="Unknown generation options: colour"):
            remote.generate(image, prepared, service.settings_for(remote, request), colour="red")


def test_the_page_through_gradio_client(cluster, image, tmp_path) -> None:
    from gradio_client import Client, handle_file

    picture = tmp_path / "red.png"
    image.save(picture)
    client = Client(cluster["url"], verbose=False, download_files=False)
    opt, t5 = cluster["models"]
    assert isinstance(client.predict(handle_file(picture), opt, "fast", api_name="/caption"), str)
    assert isinstance(client.predict(handle_file(picture), "What is it?", t5, "fast", api_name="/answer"), str)
    listed = {entry["name"]: entry for entry in client.predict(api_name="/models")}
    assert listed[opt]["state"] == "loaded" and "replicas" in listed[opt]["detail"]
    from ray import serve

    from blip_app.serving.ray_serve import APP_NAME

    served = serve.get_app_handle(APP_NAME).served.remote().result()["served"]  # the ingress's own counts
    assert {name for name, _ in served} == {opt, t5}


def test_v1_through_the_cluster_with_the_openai_sdk(cluster, image) -> None:
    """/v1 is served by the ingress as in one process (web/server.py build_app): the openai SDK lists the
    models, gets a caption and streams an answer, both computed on the inference replicas."""
    import base64
    import io

    import openai

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    picture = {"type": "image_url",
               "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}
    client = openai.OpenAI(base_url=cluster["url"].rstrip("/") + "/v1", api_key="unused", max_retries=0)
    opt, t5 = cluster["models"]
    assert {model.id for model in client.models.list()} >= {opt, t5}
    caption = client.chat.completions.create(model=opt, max_tokens=8, messages=[{"role": "user", "content": [picture]}])
    assert caption.choices[0].message.role == "assistant" and caption.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(
        model=t5, max_tokens=8, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [picture, {"type": "text", "text": "What is it?"}]}]))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": [picture]}])
    from ray import serve

    from blip_app.serving.ray_serve import APP_NAME

    served = serve.get_app_handle(APP_NAME).served.remote().result()["served"]  # the ingress's own counts
    assert {name for name, _ in served} == {opt, t5}


def test_a_replica_killed_during_a_request(cluster, image) -> None:
    service, manager, opt = cluster["service"], cluster["manager"], cluster["models"][0]
    request = service.request(Task.CAPTION, overrides=LONG)
    stream = service.stream(opt, image, request)
    first = next(stream)
    assert not first.finished
    victim = manager.recent[-1].replica
    pid = manager.pids[victim]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(GenerationError, match="stopped while handling this request"):
        for _ in stream:
            pass
    # Serve replaces the replica; meanwhile and after, requests for the same model are served.
    started = time.monotonic()
    reply = service.caption(opt, image, overrides={"max_new_tokens": 8})
    assert reply.finished and manager.recent[-1].replica != victim
    assert wait_until(lambda: len(manager.replicas()) == 2 and victim not in manager.replicas(), timeout=90,
                      every=1.0), manager.replicas()
    print(f"replaced a killed replica in {time.monotonic() - started:.1f} s", file=sys.stderr)
    done = threading.Event()
    results = []

    def caption(model: str) -> None:
        results.append(service.caption(model, image, overrides={"max_new_tokens": 8}).model)
        done.set()

    for model in cluster["models"]:
        caption(model)
    assert sorted(results) == sorted(cluster["models"])


# ---------------------------------------------------------------------------------------------- no cluster


def test_the_deploy_configs_hold_serve_ray_flags() -> None:
    import yaml

    from blip_app.serving.ray_serve import flags_from, parse_args

    serve_config = yaml.safe_load((ROOT / "deploy" / "serve-config.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    inner = yaml.safe_load(service["spec"]["serveConfigV2"])
    for config in (serve_config, inner):
        application = config["applications"][0]
        assert application["import_path"] == "blip_app.serving.ray_serve:build"
        app_config, cluster = parse_args(flags_from(application["args"]))
        assert app_config.models == tuple(application["args"]["model"])
        assert cluster.num_gpus == 1
    assert parse_args(flags_from(inner["applications"][0]["args"]))[1].autoscaling["max_replicas"] == 4
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for w in workers)


def test_flags_from_a_serve_config() -> None:
    from blip_app.serving.ray_serve import flags_from

    assert flags_from({"model": ["a", "b"], "replicas": 2, "detach": True, "ship_code": False, "address": None}) == [
        "--model", "a", "--model", "b", "--replicas", "2", "--detach"]


def test_bad_cluster_flags_are_refused(capsys) -> None:
    from blip_app.serving.ray_serve import parse_args

    for flags, message in ((["--replicas", "0"], "--replicas must be at least 1"),
                           (["--min-replicas", "3", "--max-replicas", "2"], "must not be larger"),
                           (["--num-gpus", "-1"], "must not be negative")):
        with pytest.raises(SystemExit):
            parse_args(["--model", "blip2-opt-2.7b", *flags])
        assert message in capsys.readouterr().err


def test_models_per_replica_follow_the_memory_budget(tiny_checkpoints) -> None:
    from blip_app.core.devices import LoadOptions
    from blip_app.models.loading import Loader
    from blip_app.models.manager import ModelManager

    # Catalog sizes at bfloat16: blip2-opt-2.7b about 7.4 GB, blip2-flan-t5-xl about 7.8 GB.
    offered = ["blip2-opt-2.7b", "blip2-flan-t5-xl", "instructblip-flan-t5-xl"]
    assert ModelManager(offered, LoadOptions(), loader=Loader(), memory_budget_gb=17).models_that_fit() == 2
    assert ModelManager(offered, LoadOptions(), loader=Loader(), memory_budget_gb=4).models_that_fit() == 1
    assert ModelManager(offered, LoadOptions(), loader=Loader(), memory_budget_gb=100).models_that_fit() == 3
    tiny = [str(tiny_checkpoints["blip2-opt"]), str(tiny_checkpoints["instructblip-flan-t5"])]
    assert ModelManager(tiny, LoadOptions(), loader=Loader(), memory_budget_gb=1).models_that_fit() == 2


def test_several_ingress_replicas_route_by_session() -> None:
    from blip_app.serving.ray_serve import ClusterOptions, build_application, parse_args

    config, _ = parse_args(["--model", "blip2-opt-2.7b"])
    ingress = build_application(config, ClusterOptions(ingress_replicas=3))._bound_deployment
    router = ingress._deployment_config.request_router_config
    assert ingress._deployment_config.num_replicas == 3
    assert router.request_router_class.endswith("ConsistentHashRouter")
    assert router.request_router_kwargs == {"num_fallback_replicas": 0}  # strict: a page's events need its replica
