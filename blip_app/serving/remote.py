"""The models as the ingress sees them: a manager-like proxy whose models run on inference replicas.

:class:`RemoteManager` stands where a :class:`~blip_app.models.manager.ModelManager` stands in a
:class:`~blip_app.tasks.service.Service`: the same names, refs, states, ``use`` and ``get``. What
``use`` hands out is a :class:`RemoteCaptioner` or :class:`RemoteMatcher`, which satisfy the
Captioner and Matcher protocols (models/kinds.py) by sending each phase to the inference deployment
with the model's name as Ray Serve's multiplexed model id, so that the request goes to a replica
that holds the model (or one that will load it). tasks/ and web/ run unchanged and never see Ray.

Rules:
- Every reply of a replica is a :class:`Delivery`: the value or the user-facing error (a
  :class:`~blip_app.errors.BlipAppError` crosses the process boundary as itself, never as a
  traceback), and which replica served it and which models it holds. The proxy's view of where
  models are comes from those replies, refreshed by a broadcast at most every ``refresh_s``.
- A replica that dies during a request fails that request with a GenerationError saying so; the
  request is not retried (a generation is not idempotent for its client: a stream has been shown in
  part). Serve replaces the replica and routes the next requests elsewhere meanwhile.
- Cancelling (the client's cancel event, or closing a stream) cancels the Serve request, which sets
  the engine's cancel event on the replica: the generation stops at its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from blip_app.core.devices import LoadOptions
from blip_app.errors import BlipAppError, BusyError, CancelledError, GenerationError
from blip_app.models.loading import Loader
from blip_app.models.manager import ModelManager, ModelState

log = logging.getLogger(__name__)

# How often a blocking call looks at its cancel event.
_POLL_S = 0.1


@dataclass(frozen=True)
class Delivery:
    """What an inference replica sends back for every call."""

    replica: str  # the replica's id (Serve's unique id, short)
    holds: tuple[str, ...]  # the models loaded on that replica after the call, least recently used first
    value: Any = None
    error: BlipAppError | None = None
    pid: int = 0  # the replica's process, for operators (and the tests that kill one)


@dataclass(frozen=True)
class Description:
    """A model as loaded on a replica: what the tasks read from a loaded model besides its phases."""

    name: str
    kind: str  # "captioner" or "matcher"
    plan: Any  # core.devices.LoadPlan
    spec: Any = None  # engine.ModelSpec (captioners)
    checkpoint_generation: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Served:
    """One request as the proxy saw it: which model, which replica, how long until the reply."""

    model: str
    method: str
    replica: str
    seconds: float


class RemoteManager:
    """The ModelManager of an ingress: the offered models, held by the replicas of an inference deployment.

    ``handle`` is the inference deployment's DeploymentHandle. The offered names, refs and the states
    of models no replica holds come from a local ModelManager that never loads anything.
    """

    def __init__(self, handle: Any, offered: Sequence[str], options: LoadOptions = LoadOptions(), *,
                 refresh_s: float = 10.0, history: int = 1000) -> None:
        self._catalog = ModelManager(offered, options, loader=Loader())  # never asked to load
        self.options = options
        self._handle = handle
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._described: dict[str, Description] = {}
        self._holds: dict[str, tuple[str, ...]] = {}  # replica -> models it holds
        self._plans: dict[str, Any] = {}  # model -> LoadPlan, from the replicas
        self.pids: dict[str, int] = {}  # replica -> its process id (for operators, and tests that kill one)
        self._refreshed = 0.0
        self.served: Counter[tuple[str, str]] = Counter()  # (model, replica) -> requests served
        self.recent: list[Served] = []  # the last ``history`` requests
        self._history = history

    # ---------------------------------------------------------------- what is offered (as ModelManager)

    @property
    def names(self) -> list[str]:
        """The offered model names, in the order given."""
        return self._catalog.names

    def ref(self, name: str) -> Any:
        """The offered model called ``name``; anything else is refused, naming the choices."""
        return self._catalog.ref(name)

    def is_matching(self, name: str) -> bool:
        """Whether ``name`` is an image-text matching model (decided from its catalog entry or config, here)."""
        return self._catalog.is_matching(name)

    def states(self) -> list[ModelState]:
        """Every offered model with its state; a model loaded on replicas says on how many."""
        self._refresh(stale_after=self._refresh_s)
        with self._lock:
            holds = dict(self._holds)
            plans = dict(self._plans)
        result = []
        for state in self._catalog.states():
            where = [replica for replica, names in holds.items() if state.name in names]
            if where:
                plan = plans.get(state.name)
                how = f" ({plan.precision_label} on {plan.device})" if plan is not None else ""
                state = replace(state, state="loaded",
                                detail=f"loaded on {len(where)} of {len(holds)} replicas{how}")
            result.append(state)
        return result

    def loaded_names(self) -> list[str]:
        """Names of the models some replica holds (as last seen)."""
        with self._lock:
            return [name for name in self.names if any(name in held for held in self._holds.values())]

    def replicas(self) -> dict[str, tuple[str, ...]]:
        """{replica: models it holds}, asked of every replica now."""
        self._refresh(stale_after=0.0)
        with self._lock:
            return dict(self._holds)

    # ---------------------------------------------------------------- using a model (as ModelManager)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """The model ``name`` as a proxy; a replica loads it now if none holds it."""
        yield self.get(name)

    def get(self, name: str, *, hold: bool = False) -> Any:
        """A proxy for ``name``. Asks a replica to load it unless one is known to hold it already."""
        self.ref(name)
        with self._lock:
            description = self._described.get(name)
            held = any(name in names for names in self._holds.values())
        if description is None or not held:
            description = self.call(name, "describe")
            with self._lock:
                self._described[name] = description
                self._plans[name] = description.plan
        return RemoteMatcher(self, description) if description.kind == "matcher" else RemoteCaptioner(self, description)

    def unload(self, name: str) -> None:
        """Free ``name`` on every replica (each waits for its current users to finish)."""
        self.ref(name)
        for delivery in self._handle.broadcast("unload", name).results(timeout_s=120, return_exceptions=True):
            if isinstance(delivery, Delivery):
                self._note(delivery)

    def close(self) -> None:
        """Nothing to free here: the replicas hold the models, and Serve ends them."""

    # ---------------------------------------------------------------- calls

    def call(self, model: str, method: str, *args: Any, cancel: threading.Event | None = None, **kwargs: Any) -> Any:
        """Call ``method`` of the inference deployment on a replica that holds (or will load) ``model``."""
        started = time.monotonic()
        response = self._handle.options(multiplexed_model_id=model, method_name=method).remote(*args, **kwargs)
        try:
            while True:
                try:
                    delivery = response.result(timeout_s=_POLL_S)
                    break
                except TimeoutError:
                    if cancel is not None and cancel.is_set():
                        response.cancel()
                        raise CancelledError("The request was cancelled.") from None
        except BlipAppError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of the cluster is explained
            raise explain(exc, model) from exc
        return self._received(model, method, delivery, started)

    def stream(self, model: str, method: str, *args: Any, cancel: threading.Event | None = None,
               **kwargs: Any) -> Iterator[Any]:
        """Yield the values a streaming ``method`` sends, from a replica holding ``model``.

        Closing the iterator, or setting ``cancel``, cancels the request on the replica.
        """
        started = time.monotonic()
        response = self._handle.options(multiplexed_model_id=model, method_name=method, stream=True).remote(
            *args, **kwargs)
        finished = threading.Event()
        if cancel is not None:
            def watch() -> None:
                while not finished.wait(_POLL_S):
                    if cancel.is_set():
                        response.cancel()
                        return
            threading.Thread(target=watch, name=f"cancel-watch-{model}", daemon=True).start()
        try:
            first = True
            for delivery in response:
                value = self._received(model, method, delivery, started, count=first)
                first = False
                yield value
        except BlipAppError:
            raise
        except Exception as exc:  # noqa: BLE001
            if cancel is not None and cancel.is_set():
                raise CancelledError("The request was cancelled.") from None
            raise explain(exc, model) from exc
        finally:
            if not finished.is_set():
                finished.set()
                response.cancel()  # no-op after the end; stops the replica's generation if the consumer left

    def _received(self, model: str, method: str, delivery: Any, started: float, *, count: bool = True) -> Any:
        if not isinstance(delivery, Delivery):
            raise GenerationError(f"The model server answered {type(delivery).__name__} instead of a reply; "
                                  "the ingress and the inference replicas may run different versions of blip_app.")
        self._note(delivery)
        if count:
            with self._lock:
                self.served[(model, delivery.replica)] += 1
                self.recent.append(Served(model, method, delivery.replica, time.monotonic() - started))
                del self.recent[:-self._history]
            log.debug("%s %s served by replica %s", method, model, delivery.replica)
        if delivery.error is not None:
            raise delivery.error
        return delivery.value

    def _note(self, delivery: Delivery) -> None:
        with self._lock:
            self._holds[delivery.replica] = tuple(delivery.holds)
            self.pids[delivery.replica] = delivery.pid

    def _refresh(self, *, stale_after: float) -> None:
        """Ask every replica which models it holds, if the view is older than ``stale_after`` seconds."""
        if time.monotonic() - self._refreshed < stale_after or _in_event_loop():
            return  # a handle's sync calls refuse to run on an event loop (the page is built on one)
        self._refreshed = time.monotonic()
        try:
            deliveries = self._handle.broadcast("holding").results(timeout_s=5.0, return_exceptions=True)
        except Exception:  # noqa: BLE001 - the picker keeps the last view; requests report real failures
            log.warning("Could not ask the inference replicas what they hold", exc_info=True)
            return
        view = {}
        for delivery in deliveries:
            if isinstance(delivery, Delivery):
                view[delivery.replica] = tuple(delivery.holds)
                self.pids[delivery.replica] = delivery.pid
                if isinstance(delivery.value, Mapping):
                    with self._lock:
                        self._plans.update(delivery.value)
        with self._lock:
            self._holds = view  # replicas gone since the last look drop out here


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def explain(exc: BaseException, model: str) -> BlipAppError:
    """A cluster failure as a sentence for the person who sent the request."""
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    if isinstance(exc, serve_errors.RequestCancelledError):
        return CancelledError("The request was cancelled.")
    if isinstance(exc, (ray_errors.RayActorError, serve_errors.ReplicaUnavailableError)):
        return GenerationError(
            f"The model server running {model} stopped while handling this request, so its answer was lost. "
            "Please send it again: the cluster is replacing that server, and other servers take requests meanwhile.")
    if isinstance(exc, serve_errors.BackPressureError):
        return BusyError(f"Every model server that can run {model} is busy; please try again in a moment.")
    if isinstance(exc, serve_errors.DeploymentUnavailableError):
        return BusyError("The model servers are not running right now (the cluster is starting or has stopped them); "
                         "please try again shortly.")
    if isinstance(exc, ray_errors.RayTaskError) and isinstance(exc.cause, BlipAppError):
        return exc.cause
    log.error("A model server failed on %s", model, exc_info=exc)
    return GenerationError(f"The model server running {model} failed on this request "
                           f"({type(exc).__name__}); it has been logged. Please try again.")


class _RemoteModel:
    """What both proxies share: the description, and no caches of their own."""

    def __init__(self, manager: RemoteManager, description: Description) -> None:
        self._manager = manager
        self.name = description.name
        self.plan = description.plan
        self.description = description

    @property
    def cache_bytes(self) -> int:
        """Nothing is cached here: the caches live (and are counted) on the replicas."""
        return 0

    def clear_caches(self) -> None:
        """Nothing to clear here (see cache_bytes)."""

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._manager.call(self.name, method, *args, **kwargs)


class RemoteCaptioner(_RemoteModel):
    """A BLIP-2 / InstructBLIP model on the inference replicas, as the Captioner protocol."""

    def __init__(self, manager: RemoteManager, description: Description) -> None:
        super().__init__(manager, description)
        self.spec = description.spec
        self.checkpoint_generation = dict(description.checkpoint_generation)

    def prepare(self, task: Any, **inputs: Any) -> Any:
        """Phase 1 on a replica: the prompt fitted to the context, and its token ids (engine.Prepared)."""
        return self._call("prepare", task, inputs)

    def generate(self, image: Any, prepared: Any, settings: Any, *, cancel: threading.Event | None = None,
                 on_text: Any = None, **options: Any) -> Any:
        """Phases 2 and 3 on a replica (batched there with other requests); ``on_text`` gets the text so far."""
        if on_text is None:
            return self._call("generate", image, prepared, settings, options, cancel=cancel)
        final = None
        for reply in self.stream(image, prepared, settings, cancel=cancel, **options):
            if reply.finished:
                final = reply
            else:
                on_text(reply.text)
        return final

    def stream(self, image: Any, prepared: Any, settings: Any, *, cancel: threading.Event | None = None,
               **options: Any) -> Iterator[Any]:
        """The text so far, then the final Reply, as the replica generates it."""
        return self._manager.stream(self.name, "stream", image, prepared, settings, options, cancel=cancel)


class RemoteMatcher(_RemoteModel):
    """BLIP-2's image-text matching model on the inference replicas, as the Matcher protocol."""

    def itm_scores(self, images: Sequence[Any], texts: Sequence[str] | str) -> list[float]:
        """Matching-head probabilities, computed on a replica."""
        return self._call("match", "itm_scores", list(images), texts)

    def rank(self, images: Sequence[Any], query: str, *, method: str = "itm") -> list[tuple[int, float]]:
        """Image indices with scores, best first, computed on a replica."""
        return self._call("match", "rank", list(images), query, method=method)

    def itc_matrix(self, images: Sequence[Any], texts: Sequence[str]) -> Any:
        """Contrastive similarities (images x texts), computed on a replica."""
        return self._call("match", "itc_matrix", list(images), list(texts))

    def image_features(self, image: Any) -> dict[str, Any]:
        """The features of one image by kind, computed on a replica."""
        return self._call("match", "image_features", image)

    def text_features(self, text: str) -> dict[str, Any]:
        """The features of one text by kind, computed on a replica."""
        return self._call("match", "text_features", text)
