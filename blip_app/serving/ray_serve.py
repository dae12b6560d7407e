"""blip_app on Ray Serve: ``python -m blip_app serve-ray`` and the application it deploys.

Two deployments:
- ``Inference``: each replica runs a ModelManager. Requests name their model as Serve's multiplexed
  model id (``serve.multiplexed``), so Serve routes them to a replica that holds the model, or to
  the replica with the fewest models, which loads it. A replica keeps at most as many models as its
  memory budget holds (``ModelManager.models_that_fit``, or ``--models-per-replica``); the least
  recently used one is freed first. Batching is the engine's own (captions and answers that meet on a
  replica's device run as one batch): Serve's ``@serve.batch`` would batch by call, before the prompt
  is known, and could not share the engine's per-settings batches, key/value cache or stop handling.
  Streaming: ``stream`` is a generator method called with ``handle.options(stream=True)``.
- ``Ingress``: the page, the named API endpoints (and whatever else the web layer's ASGI app serves)
  behind Serve's HTTP proxy. Its Service holds a :class:`~blip_app.serving.remote.RemoteManager`,
  which sends every model call to ``Inference``. With several ingress replicas, requests carrying
  the same ``x-session-id`` header go to the same replica (Serve's consistent-hash router, strict),
  because the page's queue keeps a visitor's events in the process that took them: the load balancer
  in front sets that header (README "Scaling out").
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from blip_app.config import AppConfig, parse_config
from blip_app.core.devices import LoadOptions
from blip_app.errors import BadInputError, BlipAppError
from blip_app.serving.remote import Delivery, Description, RemoteManager

log = logging.getLogger(__name__)

APP_NAME = "blip_app"
INFERENCE = "Inference"
INGRESS = "Ingress"
# The folder that holds the blip_app package, shipped to a cluster started here (see main).
PROJECT_ROOT = Path(__file__).resolve().parents[2]

# What the ingress may ask of a model through ``generate``/``stream`` and ``match``.
_ENGINE_OPTIONS = frozenset({"time_limit", "lock_timeout", "image_id"})
_MATCHER_METHODS = frozenset({"itm_scores", "rank", "itc_matrix", "image_features", "text_features"})


@dataclass(frozen=True)
class ClusterOptions:
    """How the app is spread over the cluster (``serve-ray`` flags, or a Serve config's ``args``)."""

    address: str | None = None  # None: start a Ray cluster in this process; "auto" or ray://host:port: join one
    replicas: int = 1  # inference replicas, when no autoscaling range is given
    min_replicas: int | None = None
    max_replicas: int | None = None
    num_cpus: float = 1.0  # per inference replica
    num_gpus: float = 0.0  # per inference replica
    memory_gb: float | None = None  # per inference replica, reserved with Ray (and its manager's budget)
    models_per_replica: int | None = None  # None: as many as the replica's memory budget holds
    max_ongoing_requests: int = 16  # per inference replica: more wait in Serve's queue (batches form from these)
    ingress_replicas: int = 1
    ingress_cpus: float = 0.0  # the ingress mostly waits on the inference replicas
    detach: bool = False  # deploy and return, leaving the app running on the cluster
    ship_code: bool = False  # send this checkout of blip_app to a joined cluster (runtime_env working_dir)

    @property
    def autoscaling(self) -> dict[str, Any] | None:
        """Serve's autoscaling_config for the inference deployment, or None for a fixed number of replicas."""
        if self.min_replicas is None and self.max_replicas is None:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        return {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, min(high, self.replicas)),
                "target_ongoing_requests": max(1, self.max_ongoing_requests // 2)}


# --------------------------------------------------------------------------------------------------
# The inference replicas


class _Holding:
    """A model the replica's multiplexer counts as loaded; freed from the manager when it is evicted.

    Serve calls ``__del__`` itself when its LRU evicts the model, and Python may call it again when
    the object is collected: only the first call frees (a later load of the same model is not touched).
    """

    def __init__(self, manager: Any, name: str) -> None:
        self.manager = manager
        self.name = name
        self._freed = False

    def __del__(self) -> None:
        if not self._freed:
            self._freed = True
            with contextlib.suppress(Exception):
                self.manager.unload(self.name)


class InferenceReplica:
    """One inference replica: a ModelManager whose models are Serve's multiplexed models."""

    def __init__(self, offered: Sequence[str], options: LoadOptions, memory_budget_gb: float | None = None,
                 models_per_replica: int | None = None, max_ongoing_requests: int = 16) -> None:
        from blip_app.models.loading import Loader
        from blip_app.models.manager import ModelManager

        logging.getLogger("blip_app").setLevel(logging.INFO)
        self.manager = ModelManager(list(offered), options, loader=Loader(), memory_budget_gb=memory_budget_gb)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.capacity = models_per_replica or self.manager.models_that_fit()
        # One thread per request Serve lets in, so that they all reach the engine, which batches them.
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=max_ongoing_requests + 2,
                                                              thread_name_prefix="inference")
        manager = self.manager

        self._plans: dict[str, Any] = {}  # model -> LoadPlan, for the picker

        async def hold(model_id: str) -> _Holding:
            model = await asyncio.get_running_loop().run_in_executor(self._threads, manager.get, model_id)
            self._plans[model_id] = model.plan
            return _Holding(manager, model_id)

        # Set at init time because the limit comes from this replica's own memory budget.
        self._hold = serve.multiplexed(max_num_models_per_replica=self.capacity)(hold)
        log.info("Inference replica %s: up to %d models at once", self.replica, self.capacity)

    # ---------------------------------------------------------------- helpers

    def _delivery(self, value: Any = None, error: BlipAppError | None = None) -> Delivery:
        return Delivery(self.replica, tuple(self.manager.loaded_names()), value, error, os.getpid())

    async def _model(self) -> str:
        """The request's model, loaded (or being kept) on this replica by the multiplexer."""
        name = serve.get_multiplexed_model_id()
        if not name:
            raise BadInputError("The request names no model (Serve's multiplexed model id is empty).")
        self.manager.ref(name)  # an unknown name is refused before the multiplexer evicts anything for it
        await self._hold(name)
        return name

    async def _run(self, work: Callable[[Any, threading.Event], Any]) -> Delivery:
        """``work(loaded_model, cancel)`` in a thread, with the model held; a cancelled request stops it."""
        cancel = threading.Event()
        try:
            name = await self._model()

            def job() -> Any:
                with self.manager.use(name) as loaded:
                    return work(loaded, cancel)

            value = await asyncio.get_running_loop().run_in_executor(self._threads, job)
        except asyncio.CancelledError:
            cancel.set()  # the engine stops at its next token
            raise
        except BlipAppError as exc:
            return self._delivery(error=exc)
        return self._delivery(value)

    # ---------------------------------------------------------------- what the ingress calls

    async def describe(self) -> Delivery:
        """Load the request's model here (if needed) and describe it (engine spec, plan, saved settings)."""
        from blip_app.models.kinds import Matcher

        def work(loaded: Any, cancel: threading.Event) -> Description:
            kind = "matcher" if isinstance(loaded, Matcher) else "captioner"
            return Description(loaded.name, kind, loaded.plan, getattr(loaded, "spec", None),
                               dict(getattr(loaded, "checkpoint_generation", {}) or {}))

        return await self._run(work)

    async def prepare(self, task: Any, inputs: Mapping[str, Any]) -> Delivery:
        """Phase 1 of a request (engine.LoadedModel.prepare)."""
        return await self._run(lambda loaded, cancel: _captioner(loaded).prepare(task, **dict(inputs)))

    async def generate(self, image: Any, prepared: Any, settings: Any, options: Mapping[str, Any]) -> Delivery:
        """Phases 2 and 3 of a request; requests that meet here are batched by the engine."""
        options = _engine_options(options)

        def work(loaded: Any, cancel: threading.Event) -> Any:
            model = _captioner(loaded)
            with model.arriving():
                return model.generate(image, prepared, settings, cancel=cancel, **options)

        return await self._run(work)

    async def stream(self, image: Any, prepared: Any, settings: Any, options: Mapping[str, Any]
                     ) -> AsyncIterator[Delivery]:
        """The text so far after each token, then the final Reply (call with ``handle.options(stream=True)``)."""
        options = _engine_options(options)
        cancel = threading.Event()
        try:
            name = await self._model()
        except BlipAppError as exc:
            yield self._delivery(error=exc)
            return
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        done = object()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, item)

        def work() -> None:
            try:
                with self.manager.use(name) as loaded:
                    for reply in _captioner(loaded).stream(image, prepared, settings, cancel=cancel, **options):
                        put(reply)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(exc)
            finally:
                put(done)

        loop.run_in_executor(self._threads, work)
        try:
            while True:
                item = await updates.get()
                if item is done:
                    return
                if isinstance(item, BlipAppError):
                    yield self._delivery(error=item)
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._delivery(item)
        finally:
            cancel.set()  # no-op after the end; stops the generation if the request was cancelled

    async def match(self, method: str, *args: Any, **kwargs: Any) -> Delivery:
        """One of the image-text matching model's methods (trust scores, search, embeddings)."""
        if method not in _MATCHER_METHODS:
            return self._delivery(error=BadInputError(f"{method!r} is not a method of the image-text matching model."))

        def work(loaded: Any, cancel: threading.Event) -> Any:
            from blip_app.models.kinds import Matcher

            if not isinstance(loaded, Matcher):
                raise BadInputError(f"{loaded.name} is a captioning model, not an image-text matching one.")
            return getattr(loaded, method)(*args, **kwargs)

        return await self._run(work)

    async def holding(self) -> Delivery:
        """Which models this replica holds, with their load plans (for the model picker)."""
        return self._delivery({name: self._plans[name] for name in self.manager.loaded_names() if name in self._plans})

    async def unload(self, name: str) -> Delivery:
        """Free ``name`` here (after its current users finish)."""
        await asyncio.get_running_loop().run_in_executor(self._threads, self.manager.unload, name)
        return self._delivery()


def _captioner(loaded: Any) -> Any:
    from blip_app.models.kinds import Captioner

    if not isinstance(loaded, Captioner):
        raise BadInputError(f"{loaded.name} is an image-text matching model: it gives trust scores and search, "
                            "not captions or answers. Choose a captioning model.")
    return loaded


def _engine_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - _ENGINE_OPTIONS
    if unknown:
        raise BadInputError(f"Unknown generation options: {', '.join(sorted(unknown))}.")
    return dict(options)


# --------------------------------------------------------------------------------------------------
# The ingress


@serve.ingress()
class Ingress:
    """The page and the APIs, as the web layer builds them, over a Service whose models are remote."""

    def __init__(self, inference: Any, config: AppConfig) -> None:
        self._inference = inference
        self._config = config
        self.manager: RemoteManager | None = None

    def __serve_build_asgi_app__(self) -> Any:
        from blip_app.tasks.service import Service
        from blip_app.web import page, server

        config = self._config
        logging.getLogger("blip_app").setLevel(logging.INFO)
        self.manager = RemoteManager(self._inference, config.offered_models, config.load)
        service = Service(config.offered_models, config.load, limits=config.limits,
                          max_message_chars=config.max_message_chars, time_limit_s=config.time_limit_s,
                          manager=self.manager)
        return server.build_app(page.build_ui(service, config), service, config)  # the page, its API and /v1

    async def served(self) -> dict[str, Any]:
        """What this ingress replica has sent where: {(model, replica): requests} and the recent requests."""
        manager = self.manager
        if manager is None:
            return {"served": {}, "recent": []}
        return {"served": dict(manager.served), "recent": list(manager.recent)}


# --------------------------------------------------------------------------------------------------
# The application


def build_application(config: AppConfig, cluster: ClusterOptions = ClusterOptions()) -> Any:
    """The Serve application (ingress bound to the inference deployment) for ``config``."""
    actor = {"num_cpus": cluster.num_cpus, "num_gpus": cluster.num_gpus}
    budget = config.memory_budget_gb
    if cluster.memory_gb is not None:
        actor["memory"] = int(cluster.memory_gb * 1024**3)
        budget = budget if budget is not None else cluster.memory_gb * 0.9  # room for the process itself
    inference_options: dict[str, Any] = {
        "name": INFERENCE, "ray_actor_options": actor, "max_ongoing_requests": cluster.max_ongoing_requests,
        # a replica that is loading a large model answers health checks late; give it time
        "health_check_timeout_s": 60, "graceful_shutdown_timeout_s": 30,
    }
    if cluster.autoscaling is not None:
        inference_options["autoscaling_config"] = cluster.autoscaling
    else:
        inference_options["num_replicas"] = cluster.replicas
    inference = serve.deployment(InferenceReplica).options(**inference_options).bind(
        config.offered_models, config.load, budget, cluster.models_per_replica, cluster.max_ongoing_requests)
    ingress_options: dict[str, Any] = {
        "name": INGRESS, "num_replicas": cluster.ingress_replicas,
        "ray_actor_options": {"num_cpus": cluster.ingress_cpus},
        "max_ongoing_requests": max(64, config.queue_size * 4),
    }
    if cluster.ingress_replicas > 1:
        from ray.serve.config import RequestRouterConfig

        # Strict affinity: a page's queue events must reach the replica that holds its session.
        ingress_options["request_router_config"] = RequestRouterConfig(
            request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
            request_router_kwargs={"num_fallback_replicas": 0})
    return serve.deployment(Ingress).options(**ingress_options).bind(inference, config)


def build(args: Mapping[str, Any] | None = None) -> Any:
    """The application builder for a Serve config file (``import_path: blip_app.serving.ray_serve:build``).

    ``args`` holds ``serve-ray``'s flags by name: ``{"model": ["a", "b"], "replicas": 2, "num_gpus": 1}``
    (a list repeats a flag, true adds a switch). The cluster is the one ``serve run`` / ``serve deploy``
    talks to, so ``address`` and ``detach`` do not apply; the HTTP host and port are the config's
    ``http_options``.
    """
    argv = flags_from(args or {})
    config, cluster = parse_args(argv)
    return build_application(config, cluster)


def flags_from(args: Mapping[str, Any]) -> list[str]:
    """A Serve config's ``args`` as ``serve-ray`` flags: ``{"model": ["a", "b"], "detach": True}`` ->
    ``["--model", "a", "--model", "b", "--detach"]`` (False and None leave a flag out)."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is True:
                argv.append(flag)
            elif item not in (None, False):
                argv += [flag, str(item)]
    return argv


def build_parser() -> argparse.ArgumentParser:
    """The flags ``serve-ray`` adds to app.py's (``python app.py --help`` lists those)."""
    parser = argparse.ArgumentParser(
        prog="python -m blip_app serve-ray", add_help=False, allow_abbrev=False,  # --model is app.py's
        description="Serve the page, the named endpoints and the APIs through Ray Serve: models on inference "
                    "replicas (multiplexed by model), the page on an ingress. Takes every app.py option too "
                    "(--model, --host, --port, --memory-budget-gb, ...; see python app.py --help).")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and app.py's options")
    group = parser.add_argument_group("Ray")
    group.add_argument("--address", help="join a running Ray cluster ('auto', or ray://HOST:10001); "
                                         "default: start one in this process [RAY_ADDRESS]")
    group.add_argument("--replicas", type=int, default=1, help="inference replicas (default 1)")
    group.add_argument("--min-replicas", type=int, help="autoscale the inference replicas from this many ...")
    group.add_argument("--max-replicas", type=int, help="... to this many, by requests in flight")
    group.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per inference replica (default 1)")
    group.add_argument("--num-gpus", type=float, default=0.0,
                       help="GPUs per inference replica (default 0; 0.5 puts two replicas on one GPU)")
    group.add_argument("--replica-memory-gb", type=float, dest="memory_gb",
                       help="memory reserved per inference replica; also its models' budget unless "
                            "--memory-budget-gb is given")
    group.add_argument("--models-per-replica", type=int,
                       help="models one replica keeps loaded (default: as many as its memory budget holds)")
    group.add_argument("--max-ongoing-requests", type=int, default=16,
                       help="requests one inference replica takes at once (default 16)")
    group.add_argument("--ingress-replicas", type=int, default=1,
                       help="page and API replicas (default 1); with more, the load balancer must send an "
                            "x-session-id header per visitor (README 'Scaling out')")
    group.add_argument("--ingress-cpus", type=float, default=0.0, help="CPUs reserved per ingress replica (default 0)")
    group.add_argument("--detach", action="store_true", help="deploy, then return; the app keeps running")
    group.add_argument("--ship-code", action="store_true",
                       help="send this checkout of blip_app to the joined cluster (runtime_env working_dir)")
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[AppConfig, ClusterOptions]:
    """``serve-ray``'s flags into the app's config and the cluster options; exits with usage on bad flags."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        print("\napp.py's options:")
        from blip_app.config import build_parser as app_parser

        app_parser().print_help()
        raise SystemExit(0)
    for flag, value, low in (("--replicas", args.replicas, 1), ("--ingress-replicas", args.ingress_replicas, 1),
                             ("--max-ongoing-requests", args.max_ongoing_requests, 1),
                             ("--models-per-replica", args.models_per_replica, 1),
                             ("--min-replicas", args.min_replicas, 0), ("--max-replicas", args.max_replicas, 1)):
        if value is not None and value < low:
            parser.error(f"{flag} must be at least {low}")
    if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
        parser.error("--min-replicas must not be larger than --max-replicas")
    if args.num_cpus < 0 or args.num_gpus < 0 or args.ingress_cpus < 0:
        parser.error("--num-cpus, --num-gpus and --ingress-cpus must not be negative")
    config = parse_config(rest)
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    cluster = ClusterOptions(address=address, replicas=args.replicas, min_replicas=args.min_replicas,
                             max_replicas=args.max_replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                             memory_gb=args.memory_gb, models_per_replica=args.models_per_replica,
                             max_ongoing_requests=args.max_ongoing_requests, ingress_replicas=args.ingress_replicas,
                             ingress_cpus=args.ingress_cpus, detach=args.detach, ship_code=args.ship_code)
    return config, cluster


def deploy(config: AppConfig, cluster: ClusterOptions, *, name: str = APP_NAME) -> str:
    """Start Serve's HTTP proxy on the config's host and port (if not running) and deploy the app; its URL.

    Ray must be initialised already (see :func:`connect`).
    """
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_application(config, cluster), name=name, route_prefix="/", blocking=False)
    if config.preload:
        handle = serve.get_deployment_handle(INFERENCE, app_name=name)
        delivery = handle.options(multiplexed_model_id=config.default_model, method_name="describe").remote().result()
        if delivery.error is not None:
            raise delivery.error
        log.info("Preloaded %s on replica %s", config.default_model, delivery.replica)
    host = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}/"


def connect(cluster: ClusterOptions, *, num_cpus: float | None = None) -> None:
    """Join the cluster at ``cluster.address``, or start one in this process (loopback only, no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    if cluster.address:
        runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": [".venv", ".git", "tests", "docs", "assets"]
                       } if cluster.ship_code else None
        ray.init(address=cluster.address, runtime_env=runtime_env, logging_level=logging.WARNING)
        return
    # A cluster of this process: its workers find blip_app where this process found it.
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": path}})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m blip_app serve-ray``: start or join a cluster, deploy, and serve until stopped."""
    config, cluster = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    connect(cluster)
    url = deploy(config, cluster)
    log.info("blip_app is served through Ray Serve at %s", url)
    if cluster.detach:
        return 0
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        log.info("Stopping: deleting the Serve application")
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if not cluster.address:
            serve.shutdown()
    return 0


__all__ = ["APP_NAME", "INFERENCE", "INGRESS", "ClusterOptions", "InferenceReplica", "Ingress", "build",
           "build_application", "connect", "deploy", "flags_from", "main", "parse_args"]
