"""The only module that touches torch and transformers: load a checkpoint, encode an image, generate.

A request goes through three named phases:

1. **prepare**: build the prompt for the task (prompts.py), fit it into the context budget, tokenize;
2. **generate**: encode the image (cached per image content), place its features on the ``<image>``
   positions, and run the language model under ``torch.inference_mode()`` while holding the device lock;
3. **decode**: strip the echoed prompt, special tokens and any new dialogue turn the model starts.

Where transformers' own ``generate`` would re-run the vision encoder on every call, this module calls
the same pieces (the vision model, the Q-Former and projection, then ``language_model.generate``) so
that an image is encoded once per model and reused. What the published checkpoints need and
transformers' defaults do not give (README "Prompts and decoding"):

* stop tokens are the language model's own (``generation_config.eos_token_id``, "\n" on blip2-opt)
  together with the tokenizer's eos, and at least one token is generated;
* the repetition penalty covers the generated tokens only, as in LAVIS;
* user text is plain text: a typed ``<image>`` or ``</s>`` is tokenized as characters;
* the Q-Former, query tokens and projection run in float32 for every family, as in LAVIS.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from blip_app.core import prompts
from blip_app.core.catalog import CheckpointKind, Family, LanguageModel, ModelRef, PromptStyle, kind_from_config
from blip_app.core.devices import WEIGHT_ONLY, Hardware, LoadOptions, LoadPlan, language_model_billions, plan_load
from blip_app.core.images import image_digest
from blip_app.core.settings import GenerationSettings, ModelTraits, Task
from blip_app.errors import (
    BadInputError,
    BusyError,
    CancelledError,
    GenerationError,
    ModelLoadError,
    PromptTooLongError,
    UnsupportedCheckpointError,
)
from blip_app.models.checkpoints import explain_load_error
from blip_app.models.hardware import OUT_OF_MEMORY, detect_hardware, free_accelerator_memory

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# InstructBLIP's Q-Former text limit in LAVIS (max_txt_len), cut from the left.
QFORMER_MAX_TEXT_TOKENS = 128


def quantization_config(plan: LoadPlan) -> Any:
    """The bitsandbytes config for a plan, or None (as the transformers quantization docs show)."""
    if plan.quantization in ("none", "int8-cpu", *WEIGHT_ONLY):  # applied after loading (speed, quantize)
        return None
    from transformers import BitsAndBytesConfig

    if plan.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[plan.dtype],
    )


# --------------------------------------------------------------------------------------------------
# The loaded model.


@dataclass(frozen=True)
class ModelSpec:
    """What the engine knows about a loaded checkpoint, read from its config (never from its name)."""

    family: Family
    language_model: LanguageModel
    prompt_style: PromptStyle
    num_query_tokens: int
    context_tokens: int  # decoder-only: positions; Flan-T5: encoder tokens
    qformer_tokens: int | None  # InstructBLIP's instruction limit in Q-Former tokens
    upgraded_layout: bool = False  # an old checkpoint given <image> tokens at load time

    @property
    def decoder_only(self) -> bool:
        """Whether the language model echoes the prompt and shares one context with the answer."""
        return self.language_model.decoder_only

    @property
    def traits(self) -> ModelTraits:
        """What the reference decoding of this model depends on (settings.task_defaults)."""
        return ModelTraits(self.family, self.language_model, self.prompt_style is PromptStyle.BLIP2_COCO)


@dataclass(frozen=True)
class Prepared:
    """A request after phase 1: the prompt, its tokens, and what had to be dropped to fit."""

    task: Task
    prompt: prompts.PromptPlan
    input_ids: tuple[int, ...]  # image placeholders followed by the prompt's tokens
    qformer_text: str | None
    prompt_tokens: int  # the prompt's own tokens (image placeholders not counted)
    context_tokens: int
    image_tokens: int

    @property
    def total_tokens(self) -> int:
        """Image placeholders plus prompt tokens."""
        return len(self.input_ids)


@dataclass(frozen=True)
class Reply:
    """The outcome of a request (or, while streaming, the text so far with ``finished`` False)."""

    text: str
    model: str
    prompt: str
    prompt_tokens: int
    image_tokens: int
    context_tokens: int
    dropped_turns: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    finished: bool = True
    stopped_early: str | None = None  # "cancelled" or "time limit" when the answer was cut short
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    reused_tokens: int = 0  # prompt tokens whose keys and values came from the conversation's cache
    batch_size: int = 1  # requests served together with this one
    token_ids: tuple[int, ...] = ()  # the new tokens as generated, before cleaning


class _DeviceLocks:
    """One lock per device: the thread that runs the model holds it, so jobs never overlap on a device."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, device: str) -> threading.Lock:
        key = "cuda" if device.startswith("cuda") else device
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    @contextlib.contextmanager
    def everywhere(self) -> Iterator[None]:
        """Hold every device: running jobs finish first, and none starts on any device until the block ends."""
        with self._guard:  # no lock is handed out meanwhile
            locks = [self._locks[key] for key in sorted(self._locks)]
            for lock in locks:
                lock.acquire()
            try:
                yield
            finally:
                for lock in reversed(locks):
                    lock.release()


DEVICE_LOCKS = _DeviceLocks()

# One from_pretrained at a time, with no model running anywhere: while it runs, transformers changes
# process-wide state (torch's default dtype, a "meta" default device, PreTrainedModel.tie_weights and
# torch.nn.init swapped out and restored afterwards). A generation meanwhile made tensors on "meta"
# ("Tensor.item() cannot be called on meta tensors"), and two loads at once could restore each
# other's stand-in, leaving tie_weights disabled for every later load (models with untied,
# freshly initialised embeddings).
_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def exclusive_load() -> Iterator[None]:
    """Around every ``from_pretrained`` of a model: no other load and no generation runs meanwhile."""
    with _LOAD_LOCK, DEVICE_LOCKS.everywhere():
        yield


class _Stopper(StoppingCriteria):
    """Stops each row on its own cancel, all rows at the time limit, or once a run-on marker was written."""

    def __init__(self, cancels: Sequence[threading.Event], deadline: float | None,
                 collector: _Collector | None) -> None:
        self.cancels = list(cancels)
        self.deadline = deadline
        self.collector = collector
        self.reasons: list[str | None] = [None] * len(self.cancels)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        rows = input_ids.shape[0]
        per_request = rows // len(self.cancels)  # beam search has num_beams rows per request
        late = self.deadline is not None and time.monotonic() > self.deadline
        ran_on = self.collector is not None and self.collector.ran_on
        stop = []
        for index, cancel in enumerate(self.cancels):
            if cancel.is_set():
                self.reasons[index] = self.reasons[index] or "cancelled"
            elif late:
                self.reasons[index] = self.reasons[index] or "time limit"
            stop.extend([bool(self.reasons[index]) or ran_on] * per_request)
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)


class _Collector(BaseStreamer):
    """Receives tokens from generate() one step at a time and publishes the cleaned text so far."""

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None] | None) -> None:
        self.decode = decode
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""
        self.ran_on = False
        self._skipped_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._skipped_prompt:  # the first call carries the prompt (or T5's decoder start token)
            self._skipped_prompt = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text, self.ran_on = clean_output(self.decode(self.ids))
        text = text.rstrip("\ufffd")  # a character whose bytes are still arriving
        if text != self.text:
            self.text = text
            if self.on_text is not None:
                self.on_text(text)

    def end(self) -> None:
        pass


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# A new dialogue turn started by the model: "Question:" after a space or a sentence, or "Q:" at the start
# of a line or after a sentence. Case matters: "your question: it is red" is prose.
_NEW_TURN = re.compile(r"(?<=[\s.!?])Question:|(?:(?<=\n)|(?<=[.!?] ))Q:")
# A label the model put before its answer; the answer after it is kept.
_ANSWER_LABEL = re.compile(r"^\s*(?:short\s+)?answer\s*:\s*", re.IGNORECASE)


def clean_output(text: str) -> tuple[str, bool]:
    """The answer without control characters, a leading "Answer:" label, and any new dialogue turn the
    model starts once the answer has begun ("... Question: ...", "...\nQ: ...").

    Returns the text and whether a new turn was cut.
    """
    body = _ANSWER_LABEL.sub("", _CONTROL_CHARS.sub("", text), count=1)
    for match in _NEW_TURN.finditer(body):
        if body[: match.start()].strip():  # the answer has started
            return body[: match.start()].strip(), True
    return body.strip(), False


class FeatureCache:
    """Least-recently-used store of image features, keyed by image content (and instruction)."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def __contains__(self, key: tuple) -> bool:
        """Whether ``key`` is stored (not counted as a hit or a miss)."""
        with self._lock:
            return key in self._items

    def put(self, key: tuple, value: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        with self._lock:
            return sum(t.numel() * t.element_size() for t in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


@dataclass(eq=False)
class _Job:
    """One request on its way through the device: inputs, then results."""

    image: Image.Image
    prepared: Prepared
    image_id: str
    cancel: threading.Event
    deadline: float | None
    submitted: float = field(default_factory=time.monotonic)
    new_ids: list[int] = field(default_factory=list)
    reason: str | None = None
    error: BaseException | None = None
    reused_tokens: int = 0
    batch_size: int = 1
    done: threading.Event = field(default_factory=threading.Event)


# The request of this thread that was announced to a batcher (LoadedModel.arriving) and not yet queued.
_ARRIVING: contextvars.ContextVar[tuple[_Batcher, dict[str, bool]] | None] = contextvars.ContextVar(
    "blip_app_arriving", default=None)


class _Batcher:
    """Serves requests that arrive while the device is busy in one batch, without a thread of its own.

    Each caller queues its job and waits for the device lock; whoever gets the lock takes every
    queued job with the same settings (up to ``max_batch``), runs them together, and wakes their
    callers. A caller whose job was served by someone else returns without touching the device.

    Requests announced as on their way (:meth:`LoadedModel.arriving`: validated, being prepared) are
    waited for a moment (``model.coalesce_s``, 20 ms) before a batch starts, so that requests sent
    together are served together even when one of them reaches the device first; without the wait,
    simultaneous requests were split over two batches (figures: docs/cpu-accelerations.md, "Batching:
    the coalesce window"). A request that finds itself alone with nothing announced first yields for one
    interpreter switch interval (5 ms), so that requests started at the same moment can announce
    themselves at all.
    """

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._pending: list[tuple[_Job, GenerationSettings]] = []
        self._guard = threading.Lock()
        self.arriving = 0

    @contextlib.contextmanager
    def announce(self) -> Iterator[None]:
        state = {"counted": True}
        with self._guard:
            self.arriving += 1
        reset = _ARRIVING.set((self, state))
        try:
            yield
        finally:
            _ARRIVING.reset(reset)
            self._arrived(state)

    def _arrived(self, state: dict[str, bool]) -> None:
        with self._guard:
            if state["counted"]:
                state["counted"] = False
                self.arriving -= 1

    def arrived_here(self) -> None:
        """This thread's announced request has reached the engine (queued, or not batchable)."""
        current = _ARRIVING.get()
        if current is not None and current[0] is self:
            self._arrived(current[1])

    def _coalesce(self, settings: GenerationSettings) -> None:
        """Holding the device: wait briefly for announced requests still on their way."""
        end = time.monotonic() + self.model.coalesce_s
        while time.monotonic() < end:
            with self._guard:
                queued = sum(1 for _, s in self._pending if s == settings)
                if self.arriving <= 0 or queued >= self.model.max_batch:
                    return
            time.sleep(0.001)

    def submit(self, job: _Job, settings: GenerationSettings, lock_timeout: float | None) -> None:
        with self._guard:
            self._pending.append((job, settings))
        self.arrived_here()
        lock = DEVICE_LOCKS.get(self.model.plan.device)
        deadline = None if lock_timeout is None else time.monotonic() + lock_timeout
        while not job.done.is_set():
            if job.cancel.is_set() and self._withdraw(job, settings):  # cancelled while waiting: leave now
                raise CancelledError("The request was cancelled before it started.")
            wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            if lock.acquire(timeout=wait):
                try:
                    if self.arriving <= 0 and self._alone(settings):
                        # Requests sent at the same moment as this one may not have run a line yet (the
                        # first thread can hold the interpreter for its whole way here): give them one
                        # switch interval to announce themselves, then wait for the announced ones.
                        time.sleep(sys.getswitchinterval())
                    if self.arriving > 0:
                        self._coalesce(settings)
                    batch = self._take(job, settings)
                    if batch:
                        self.model._run(batch, settings)
                        for served in batch:
                            served.done.set()
                finally:
                    lock.release()
            elif deadline is not None and time.monotonic() >= deadline and not job.done.is_set():
                with self._guard:
                    if (job, settings) in self._pending:
                        self._pending.remove((job, settings))
                        raise BusyError("The model is busy with other requests; please try again in a moment.")

    def _alone(self, settings: GenerationSettings) -> bool:
        with self._guard:
            return sum(1 for _, s in self._pending if s == settings) <= 1

    def _withdraw(self, job: _Job, settings: GenerationSettings) -> bool:
        """Take ``job`` out of the queue if no one has started it yet; returns whether it was."""
        with self._guard:
            if (job, settings) in self._pending:
                self._pending.remove((job, settings))
                return True
        return False

    def _take(self, job: _Job, settings: GenerationSettings) -> list[_Job]:
        """Queued jobs to run now with ``settings``: this caller's own job, if still queued, and its peers."""
        with self._guard:
            if not any(queued is job for queued, _ in self._pending):
                return []
            batch = [queued for queued, s in self._pending if s == settings][: self.model.max_batch]
            self._pending = [(q, s) for q, s in self._pending if q not in batch]
        return batch


def _acquire(lock: threading.Lock, cancel: threading.Event, timeout: float | None) -> bool:
    """Wait for ``lock`` (at most ``timeout`` seconds); a request cancelled meanwhile stops waiting.

    Returns whether the lock was taken; raises CancelledError once ``cancel`` is set, so that a client
    that went away leaves no thread waiting for the device.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
        if lock.acquire(timeout=wait):
            return True
        if cancel.is_set():
            raise CancelledError("The request was cancelled before it started.")
        if deadline is not None and time.monotonic() >= deadline:
            return False


class PrefixCache:
    """Key/value caches of recent conversations on a decoder-only model, least recently used evicted.

    An entry holds the token ids whose keys and values it stores, under the image features they were
    computed with. A new turn takes the entry sharing the longest prefix with its prompt, cut back to
    that prefix, so only the new tokens are computed; the extended cache is then put back. An entry
    is out of the store while a generation uses it, so a failure never leaves a half-written one.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[tuple, tuple[int, ...], Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._next = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries."""
        return sum(entry[3] for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: tuple, ids: Sequence[int]) -> tuple[Any, int]:
        """The cache sharing the longest prefix with ``ids`` (cut to it, leaving one token to compute)."""
        with self._lock:
            best, best_len = None, 0
            for entry_id, (entry_key, entry_ids, _, _) in self._entries.items():
                if entry_key != key:
                    continue
                common = _common_prefix(entry_ids, ids)
                if common > best_len:
                    best, best_len = entry_id, common
            if best is None:
                return None, 0
            _, entry_ids, cache, _ = self._entries.pop(best)
        keep = min(best_len, len(ids) - 1)
        cache.crop(keep - len(entry_ids)) if keep < len(entry_ids) else None
        return cache, keep

    def put(self, key: tuple, ids: tuple[int, ...], cache: Any) -> None:
        """Store a conversation's cache; evict the least recently used entries beyond the byte budget."""
        size = _cache_bytes(cache)
        if size > self.max_bytes:
            return
        with self._lock:
            self._next += 1
            self._entries[self._next] = (key, ids, cache, size)
            while self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = min(len(a), len(b))
    for index in range(length):
        if a[index] != b[index]:
            return index
    return length


def _cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class LoadedModel:
    """A checkpoint in memory with its processor, and the three phases of a request."""

    def __init__(
        self,
        name: str,
        model: Any,
        processor: Any,
        spec: ModelSpec,
        plan: LoadPlan,
        *,
        checkpoint_generation: Mapping[str, Any] | None = None,
        feature_cache_size: int = 64,
        prefix_cache_bytes: int | None = 1024 * 2**20,
        max_batch: int = 8,
        coalesce_s: float = 0.02,
    ) -> None:
        self.name = name
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.spec = spec
        self.plan = plan
        self.checkpoint_generation = dict(checkpoint_generation or {})
        self.features = FeatureCache(feature_cache_size)
        self.image_token_id = int(model.config.image_token_index)
        on_plan_device = plan.quantization in ("none", "int8-cpu", *WEIGHT_ONLY)  # bitsandbytes places layers itself
        self.device = torch.device(plan.device if on_plan_device else _first_device(model))
        self.vision_dtype = next(model.vision_model.parameters()).dtype
        # The tokenizer's special and added tokens by id, and what it adds around any text (BOS or EOS).
        self._special_texts = {int(i): str(t) for i, t in self.tokenizer.added_tokens_decoder.items()}
        self._special_texts.update(zip(self.tokenizer.all_special_ids, self.tokenizer.all_special_tokens))
        self._frame = self.tokenizer("", verbose=False).input_ids
        self._frame_first = self.tokenizer("a", verbose=False).input_ids[: len(self._frame)] == self._frame
        self.stop_ids = self._stop_token_ids()
        self.suppressed_ids = self._suppressed_token_ids()
        if getattr(processor, "qformer_tokenizer", None) is not None:
            processor.qformer_tokenizer.truncation_side = "left"  # the newest question is never cut
        self.prefix_cache = PrefixCache(prefix_cache_bytes or 2**62) if spec.decoder_only else None
        self.max_batch = max_batch
        self.coalesce_s = coalesce_s
        self._batcher = _Batcher(self)
        self.static_cache = False  # see set_static_cache
        self.compile_config: Any = None

    # ---------------------------------------------------------------- load

    @classmethod
    def load(
        cls,
        ref: ModelRef,
        options: LoadOptions = LoadOptions(),
        *,
        hardware: Hardware | None = None,
        source: str | None = None,
        **engine_options: Any,
    ) -> LoadedModel:
        """Load ``ref`` (from ``source`` if given: a local snapshot of it) and upgrade an old layout."""
        where = source or ref.source
        common = {"revision": options.revision, "cache_dir": options.cache_dir,
                  "local_files_only": options.local_files_only}
        if source is not None:
            common = {"local_files_only": True}
        try:
            config = AutoConfig.from_pretrained(where, **common)
        except Exception as exc:  # noqa: BLE001 - every cause is explained below
            raise _load_error(exc, ref) from exc
        config_dict = config.to_dict()
        kind = kind_from_config(config_dict, ref.label)
        plan = plan_load(kind.language_model, options, hardware or detect_hardware(),
                         language_billions=language_model_billions(config_dict.get("text_config") or {}))
        for note in plan.notes:
            log.warning("%s: %s", ref.label, note)
        kwargs: dict[str, Any] = {"dtype": DTYPES[plan.dtype], "device_map": plan.device_map, **common}
        qconfig = quantization_config(plan)
        if qconfig is not None:
            kwargs["quantization_config"] = qconfig
        try:
            with exclusive_load():
                processor = AutoProcessor.from_pretrained(where, **common)
                model = AutoModelForImageTextToText.from_pretrained(where, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise _load_error(exc, ref) from exc
        model.eval()
        upgraded = upgrade_old_layout(model, processor, ref.label)
        keep_qformer_float32(model)
        spec = _spec_from(model, kind, ref, upgraded)
        generation = _saved_generation_settings(where, common)
        applied = speed_up(model, plan, options, source=where)
        log.info("Loaded %s (%s, %s on %s%s)", ref.label, kind.family.value, plan.precision_label, plan.device,
                 f"; {', '.join(applied)}" if applied else "")
        loaded = cls(ref.name, model, processor, spec, plan, checkpoint_generation=generation, **engine_options)
        if options.static_cache:
            loaded.set_static_cache(True)
        return loaded

    def set_static_cache(self, enabled: bool, compile_config: Any = "auto") -> None:
        """The static key/value cache with a compiled decode step (``--static-cache``), or back to eager.

        ``compile_config`` "auto": transformers' ``CompileConfig(mode="reduce-overhead")`` on a GPU (its
        automatic compilation of the decode step, CUDA graphs) and none on a CPU, where a compiled step
        gained nothing without inductor's freezing (STACK.md). Tests pass a config of their own to run the
        compiled path on a CPU."""
        from transformers import CompileConfig

        self.static_cache = bool(enabled)
        if compile_config == "auto":
            compile_config = CompileConfig(mode="reduce-overhead") if self.device.type == "cuda" else None
        self.compile_config = compile_config if enabled else None

    # ---------------------------------------------------------------- phase 1: prepare

    def arriving(self) -> contextlib.AbstractContextManager[None]:
        """Around preparing and generating one request: batches about to start wait a moment for it."""
        return self._batcher.announce()

    def tokenize(self, text: str) -> list[int]:
        """A prompt's language-model ids (with the tokenizer's BOS or EOS); special tokens typed in it are
        plain text.

        ``split_special_tokens`` keeps the tokenizer from matching its added tokens (``<image>``, ``[PAD]``)
        in the text, but a Unigram model (T5) still holds ``<pad>``, ``</s>`` and ``<unk>`` as ordinary
        pieces with the best score: a special token the user typed that comes out whole is tokenized
        again in two halves, and any special id left is dropped.
        """
        ids = self.tokenizer(text, verbose=False, split_special_tokens=True).input_ids
        specials = self._special_texts
        typed = {i for i in ids if i in specials and specials[i] in text}
        if not typed:
            return ids
        frame = len(self._frame)
        head, body, tail = ((ids[:frame], ids[frame:], []) if self._frame_first
                            else ([], ids[: len(ids) - frame], ids[len(ids) - frame:]))
        out: list[int] = []
        for token in body:
            if token not in typed:
                out.append(token)
                continue
            for part in (specials[token][:1], specials[token][1:]):
                part_ids = self.tokenizer(part, add_special_tokens=False, split_special_tokens=True).input_ids
                out.extend(i for i in part_ids if i not in specials)
        return head + out + tail

    def count_tokens(self, text: str) -> int:
        """Language-model tokens of a prompt text, the tokenizer's own special tokens included."""
        return len(self.tokenize(text))

    def text_budget(self, max_new_tokens: int) -> int:
        """Prompt tokens that fit beside the image tokens (and, for decoder-only models, the answer)."""
        budget = self.spec.context_tokens - self.spec.num_query_tokens
        if self.spec.decoder_only:
            budget -= max_new_tokens
        return budget

    def prepare(
        self,
        task: Task,
        *,
        question: str = "",
        history: Sequence[prompts.Turn] = (),
        short: bool = False,
        detailed: bool = False,
        max_new_tokens: int = 30,
        preset: Any = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Prepared:
        """Phase 1: the prompt for a task, fitted into the context, and its token ids.

        ``preset`` and ``overrides`` (the request's own, see kinds.Captioner) are not needed here: the
        service hands this model its resolved settings."""
        style = self.spec.prompt_style
        budget = self.text_budget(max_new_tokens)
        if task is Task.CAPTION:
            plan = prompts.caption_prompt(style, detailed=detailed)
        elif task is Task.ANSWER:
            plan = prompts.answer_prompt(style, question, short=short)
        else:
            plan = prompts.fit_chat(style, history, question, count_tokens=self.count_tokens, budget=budget)
        ids = self.tokenize(plan.text)
        if len(ids) > budget:
            what = "question" if task is not Task.CAPTION else "caption prompt"
            raise PromptTooLongError(
                f"The {what} is {len(ids):,} tokens long, but this model can take at most {max(budget, 0):,} "
                f"tokens of text with the image ({self.spec.num_query_tokens} tokens)"
                + (f" and a {max_new_tokens}-token answer." if self.spec.decoder_only else ".")
                + " Please shorten it" + (" or lower max_new_tokens." if self.spec.decoder_only else ".")
            )
        qformer_text = plan.text if self.spec.family is Family.INSTRUCTBLIP else None
        input_ids = (self.image_token_id,) * self.spec.num_query_tokens + tuple(ids)
        return Prepared(task, plan, input_ids, qformer_text, len(ids), self.spec.context_tokens,
                        self.spec.num_query_tokens)

    # ---------------------------------------------------------------- phase 2: image features

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The image processor's tensor for one RGB image, on the vision model's device and dtype."""
        pixels = self.processor.image_processor(images=[image], return_tensors="pt").pixel_values
        return pixels.to(self.device, self.vision_dtype)

    @torch.inference_mode()
    def image_features(self, image: Image.Image, qformer_text: str | None = None, *, key: str | None = None
                       ) -> torch.Tensor:
        """Language-model inputs for an image (num_query_tokens x hidden), computed once per image content.

        BLIP-2's features depend on the image alone. InstructBLIP's Q-Former also reads the prompt text:
        the vision encoder's output is cached per image and the Q-Former runs per text.
        """
        key = key or image_digest(image)
        instruct = self.spec.family is Family.INSTRUCTBLIP
        full_key = (key, qformer_text if instruct else None)
        cached = self.features.get(full_key)
        if cached is not None:
            return cached
        vision_key = (key, "<vision>")
        image_embeds = self.features.get(vision_key) if instruct else None
        if image_embeds is None:
            image_embeds = self.model.vision_model(pixel_values=self.pixel_values(image),
                                                   return_dict=True).last_hidden_state
            if instruct:
                self.features.put(vision_key, image_embeds)
        queries = self.query_outputs(image_embeds, (qformer_text or "") if instruct else None)
        projection = self.model.language_projection
        features = projection(queries.to(projection.weight.dtype)).to(self.model.get_input_embeddings().weight.dtype)
        self.features.put(full_key, features)
        return features

    @torch.inference_mode()
    def _encode_images(self, jobs: Sequence[_Job]) -> int:
        """Vision encoder (and, for BLIP-2, Q-Former) once for all of a batch's images not cached yet: the
        requests of a batch with different images share one pass (4 images, one call), and each result goes
        into the feature cache, where :meth:`image_features` finds it. Returns how many images it encoded.

        One image alone takes the usual path (nothing to share). Rows of a batched pass are computed as
        they would be alone, so the tokens do not change (tested against one-by-one requests)."""
        instruct = self.spec.family is Family.INSTRUCTBLIP
        todo: dict[str, Image.Image] = {}
        for job in jobs:
            key = job.image_id
            if key in todo or (key, job.prepared.qformer_text if instruct else None) in self.features:
                continue
            if instruct and (key, "<vision>") in self.features:
                continue
            todo[key] = job.image
        if len(todo) < 2:
            return 0
        pixels = torch.cat([self.pixel_values(image) for image in todo.values()])
        embeds = self.model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state
        if instruct:  # the Q-Former reads each request's text: it runs per request in image_features
            for index, key in enumerate(todo):
                self.features.put((key, "<vision>"), embeds[index:index + 1])
        else:
            projection = self.model.language_projection
            queries = self.query_outputs(embeds, None)
            features = projection(queries.to(projection.weight.dtype)).to(
                self.model.get_input_embeddings().weight.dtype)
            for index, key in enumerate(todo):
                self.features.put((key, None), features[index:index + 1])
        return len(todo)

    def query_outputs(self, image_embeds: torch.Tensor, text: str | None) -> torch.Tensor:
        """The Q-Former's query outputs for vision states (transformers' get_image_features, step 2), in the
        Q-Former's own precision (float32: :func:`keep_qformer_float32`).

        ``text`` is InstructBLIP's Q-Former text (None for BLIP-2), cut from the left to
        QFORMER_MAX_TEXT_TOKENS (or the Q-Former's own position limit, if lower); special tokens in it
        are plain text.
        """
        if text is None:
            return qformer_queries(self.model, image_embeds)
        limit = min(QFORMER_MAX_TEXT_TOKENS, self.spec.qformer_tokens or QFORMER_MAX_TEXT_TOKENS)
        encoded = self.processor.qformer_tokenizer(text, truncation=True, max_length=limit,
                                                   split_special_tokens=True, return_tensors="pt")
        return qformer_queries(self.model, image_embeds, encoded.input_ids, encoded.attention_mask)

    # ---------------------------------------------------------------- phase 2: generate

    def _stop_token_ids(self) -> list[int]:
        """The language model's own stop tokens (an int or a list in its generation config, as transformers
        reads it from ``text_config``: "\\n" on blip2-opt) together with the tokenizer's eos."""
        configured = self.model.language_model.generation_config.eos_token_id
        ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        ids.append(self.tokenizer.eos_token_id)
        return sorted({int(i) for i in ids if i is not None and int(i) >= 0})

    def _suppressed_token_ids(self) -> list[int]:
        """Ids never worth generating: the image placeholder, padding, and the rows past the tokenizer
        that a resized or padded embedding has (blip2-opt: 50304 rows for 50266 tokens). Never a stop id."""
        ids = {self.image_token_id, *range(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)}
        if self.tokenizer.pad_token_id is not None:
            ids.add(int(self.tokenizer.pad_token_id))
        return sorted(ids - set(self.stop_ids))

    def _inputs_embeds(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = (input_ids == self.image_token_id).unsqueeze(-1).to(embeds.device)
        return embeds.masked_scatter(mask, features.to(embeds.device, embeds.dtype))

    def generate(
        self,
        image: Image.Image,
        prepared: Prepared,
        settings: GenerationSettings,
        *,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        time_limit: float | None = None,
        lock_timeout: float | None = None,
        image_id: str | None = None,
    ) -> Reply:
        """Phases 2 and 3 for one request; the device lock is held by the thread that runs the model.

        Captions and answers that arrive while the device is busy are served together in one batch
        (see :class:`_Batcher`); a chat turn reuses the key/value cache of its conversation so far.
        ``on_text`` receives the cleaned text so far after each token (greedy and sampling only).
        ``cancel`` stops the work itself at the next token. Raises CancelledError if cancelled,
        BusyError if the device stays busy past ``lock_timeout``, GenerationError on out-of-memory.
        """
        job = _Job(image, prepared, image_id or image_digest(image), cancel or threading.Event(),
                   time.monotonic() + time_limit if time_limit is not None else None)
        if on_text is None and prepared.task is not Task.CHAT and self.max_batch > 1:
            self._batcher.submit(job, settings, lock_timeout)
        else:
            self._batcher.arrived_here()  # not batchable: no batch waits for it
            lock = DEVICE_LOCKS.get(self.plan.device)
            if not _acquire(lock, job.cancel, lock_timeout):
                raise BusyError("The model is busy with other requests; please try again in a moment.")
            try:
                self._run([job], settings, on_text)
            finally:
                lock.release()
        return self._reply(job, settings)

    def _reply(self, job: _Job, settings: GenerationSettings) -> Reply:
        if job.error is not None:
            raise job.error
        if job.reason == "cancelled":
            raise CancelledError("The request was cancelled.")
        text, _ = clean_output(self.decode(job.new_ids))
        prepared = job.prepared
        return Reply(
            text=text,
            model=self.name,
            prompt=prepared.prompt.text,
            prompt_tokens=prepared.prompt_tokens,
            image_tokens=prepared.image_tokens,
            context_tokens=prepared.context_tokens,
            dropped_turns=prepared.prompt.dropped_turns,
            new_tokens=len(job.new_ids),
            seconds=time.monotonic() - job.submitted,
            stopped_early=job.reason,
            settings=settings,
            reused_tokens=job.reused_tokens,
            batch_size=job.batch_size,
            token_ids=tuple(job.new_ids),
        )

    def _run(self, jobs: list[_Job], settings: GenerationSettings, on_text: Callable[[str], None] | None = None
             ) -> None:
        """Run jobs that share settings as one batch (device lock held); results and errors go on the jobs."""
        live = []
        for job in jobs:
            if job.cancel.is_set():
                job.error = CancelledError("The request was cancelled before it started.")
            elif (count := job.prepared.input_ids.count(self.image_token_id)) != self.spec.num_query_tokens:
                # Checked before features are placed: a malformed request fails alone, never its batch.
                job.error = BadInputError(
                    f"This request has {count} image positions where {self.name} needs exactly "
                    f"{self.spec.num_query_tokens}, so it was not run.")
            else:
                live.append(job)
        if not live:
            return
        try:
            self._generate_ids(live, settings, on_text)
        except OUT_OF_MEMORY as exc:
            self.clear_caches()
            free_accelerator_memory()
            error = GenerationError(
                "The model ran out of memory on this request. Try fewer new tokens, fewer beams, "
                "a shorter conversation or a smaller model."
            )
            error.__cause__ = exc
            for job in live:
                job.error = error
        except BaseException as exc:  # noqa: BLE001 - each waiting caller gets the failure
            for job in live:
                job.error = exc

    @torch.inference_mode()
    def _generate_ids(self, jobs: list[_Job], settings: GenerationSettings,
                      on_text: Callable[[str], None] | None) -> None:
        """Run the language model on image features and prompt ids; put new ids and stop reasons on the jobs."""
        self._encode_images(jobs)
        features = torch.cat([self.image_features(job.image, job.prepared.qformer_text, key=job.image_id)
                              for job in jobs])
        width = max(len(job.prepared.input_ids) for job in jobs)
        pad = self._pad_id()
        rows = [(pad,) * (width - len(job.prepared.input_ids)) + job.prepared.input_ids for job in jobs]
        input_ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(job.prepared.input_ids)) + [1] * len(job.prepared.input_ids) for job in jobs],
            dtype=torch.long, device=self.device,
        )
        inputs = {"inputs_embeds": self._inputs_embeds(input_ids, features), "attention_mask": attention_mask}
        if self.spec.decoder_only:
            inputs["input_ids"] = input_ids
        streams = settings.streams and len(jobs) == 1 and on_text is not None
        collector = _Collector(self.decode, on_text) if streams else None
        stopper = _Stopper([job.cancel for job in jobs], min((j.deadline for j in jobs if j.deadline), default=None),
                           collector)
        kwargs = settings.generate_kwargs()
        if self.spec.decoder_only and kwargs["repetition_penalty"] != 1.0:
            # LAVIS passes only embeddings, so its penalty never touches the prompt or the history;
            # transformers' own penalty would (it sees input_ids). Penalise the new tokens only.
            kwargs["logits_processor"] = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(
                float(kwargs.pop("repetition_penalty")), prompt_ignore_length=width)])
        kwargs.update(
            stopping_criteria=StoppingCriteriaList([stopper]),
            suppress_tokens=self.suppressed_ids,
            pad_token_id=pad,
            eos_token_id=self.stop_ids,
            return_dict_in_generate=True,
        )
        if not self.spec.decoder_only:
            kwargs["decoder_start_token_id"] = self._decoder_start_id()
        if collector is not None:
            kwargs["streamer"] = collector
        feature_key = (jobs[0].image_id, jobs[0].prepared.qformer_text)
        reuse = (self.prefix_cache is not None and len(jobs) == 1 and settings.num_beams == 1
                 and jobs[0].prepared.task is Task.CHAT)
        if reuse:
            cache, jobs[0].reused_tokens = self.prefix_cache.take(feature_key, jobs[0].prepared.input_ids)
            kwargs["past_key_values"] = cache or DynamicCache(config=self.model.language_model.config)
        elif self.static_cache:
            # The GPU fast path (LoadOptions.static_cache): a preallocated key/value cache, so that the decode
            # step has fixed shapes and transformers compiles it (CUDA graphs with "reduce-overhead"), as
            # its CompileConfig documentation shows. A chat turn that reuses its conversation keeps the
            # dynamic cache (a static one per conversation would hold the whole context's memory).
            kwargs["cache_implementation"] = "static"
            if self.compile_config is not None:
                kwargs["compile_config"] = self.compile_config
        with _seeded(settings, self.device):
            output = self.model.language_model.generate(**inputs, **kwargs)
        sequences = output.sequences.tolist()
        if reuse and output.past_key_values is not None:
            cached = output.past_key_values.get_seq_length()
            self.prefix_cache.put(feature_key, tuple(sequences[0][:cached]), output.past_key_values)
        start = self._decoder_start_id() if not self.spec.decoder_only else None
        stops = set(self.stop_ids)
        for index, (job, sequence) in enumerate(zip(jobs, sequences)):
            if self.spec.decoder_only:
                sequence = sequence[width:]
            elif sequence and sequence[0] == start:
                sequence = sequence[1:]
            # a row of a batch that stopped early is padded to the others' length after its stop token
            end = next((i + 1 for i, token in enumerate(sequence) if token in stops), len(sequence))
            job.new_ids = sequence[:end]
            job.reason = stopper.reasons[index]
            job.batch_size = len(jobs)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def _decoder_start_id(self) -> int:
        text_config = self.model.config.text_config
        start = text_config.decoder_start_token_id
        if start is None:
            start = self.checkpoint_generation.get("decoder_start_token_id", self._pad_id())
        return int(start)

    # ---------------------------------------------------------------- caches

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the conversations' key/value caches and the image features (the manager counts them)."""
        prefix = self.prefix_cache.nbytes if self.prefix_cache is not None else 0
        return prefix + self.features.nbytes

    def clear_caches(self) -> None:
        """Drop the key/value caches and image features (out of memory, parked, freed)."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self.features.clear()

    # ---------------------------------------------------------------- phase 3: decode

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids to text without special tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---------------------------------------------------------------- streaming

    def stream(
        self,
        image: Image.Image,
        prepared: Prepared,
        settings: GenerationSettings,
        *,
        cancel: threading.Event | None = None,
        time_limit: float | None = None,
        lock_timeout: float | None = None,
        image_id: str | None = None,
    ) -> Iterator[Reply]:
        """Yield the text so far (``finished`` False) as it is generated, then the final Reply.

        Generation runs in its own thread, which holds the device lock. An exception there reaches
        the caller at once; closing this iterator (a client that went away) stops the generation.
        """
        cancel = cancel or threading.Event()
        updates: queue.Queue = queue.Queue()
        done = object()

        def on_text(text: str) -> None:
            updates.put(text)

        def work() -> None:
            try:
                updates.put(self.generate(image, prepared, settings, on_text=on_text, cancel=cancel,
                                          time_limit=time_limit, lock_timeout=lock_timeout, image_id=image_id))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                updates.put(exc)
            finally:
                updates.put(done)

        thread = threading.Thread(target=work, name=f"generate-{self.name}", daemon=True)
        thread.start()
        partial = Reply(text="", model=self.name, prompt=prepared.prompt.text, prompt_tokens=prepared.prompt_tokens,
                        image_tokens=prepared.image_tokens, context_tokens=prepared.context_tokens,
                        dropped_turns=prepared.prompt.dropped_turns, finished=False, settings=settings)
        try:
            while True:
                item = updates.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Reply):
                    yield item
                else:
                    yield replace(partial, text=item)
        finally:
            cancel.set()  # no-op after a normal end; stops the thread if the consumer went away


def qformer_queries(model: Any, image_embeds: torch.Tensor, text_ids: torch.Tensor | None = None,
                    text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Q-Former's query outputs (N x queries x hidden) for vision states, with InstructBLIP's text if
    given: the one place the Q-Former is called on images (the engine, and retrieval's matching model).

    As transformers' ``get_image_features`` does (modeling_blip_2.py, modeling_instructblip.py): the
    learned queries attend to every vision state; the text, when given, follows the queries.
    """
    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    device = image_embeds.device
    image_mask = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=device)
    text_inputs: dict[str, Any] = {}
    if text_ids is not None:
        query_mask = torch.ones(query_tokens.size()[:-1], dtype=torch.long, device=device)
        mask = text_mask if text_mask is not None else torch.ones_like(text_ids)
        text_inputs = {"input_ids": text_ids.to(device), "attention_mask": torch.cat([query_mask, mask.to(device)], 1)}
    output = model.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds.to(query_tokens.dtype),
                           encoder_attention_mask=image_mask, return_dict=True, **text_inputs)
    return output.last_hidden_state[:, : query_tokens.size(1), :]


def speed_up(model: Any, plan: LoadPlan, options: LoadOptions, *, source: str | None = None) -> tuple[str, ...]:
    """After loading: the weight-only quantization asked for (:mod:`blip_app.models.quantize`, from its disk
    cache when it holds this checkpoint), then on a CPU what :mod:`blip_app.models.speed` measured to help:
    weights resident in RAM, dense bfloat16 kernels by rule, eager attention in a decoder-only language
    model (so that prefix reuse is exact); int8-cpu when asked for.

    The quantization comes first, so the bfloat16 weights it replaces are never copied out of the
    memory-mapped file. Nothing else on a GPU or for bitsandbytes. ``options.cpu_speedups=False`` leaves
    the rest exactly as ``from_pretrained`` made it (a quantization asked for is still applied).
    Returns what was applied.
    """
    from blip_app.models import quantize, speed

    if plan.quantization in WEIGHT_ONLY:
        quantize.apply(model, plan.quantization, source=source or "", revision=options.revision,
                       cache_dir=options.quantized_cache_dir)
    if plan.device != "cpu" or plan.quantization not in ("none", "int8-cpu", *WEIGHT_ONLY):
        return speed.applied(model)
    int8 = plan.quantization == "int8-cpu"
    if options.cpu_speedups:
        return speed.apply_cpu_defaults(model, int8=int8)
    if int8:
        speed.quantize_int8(model.language_model)
    return speed.applied(model)


def _first_device(model: Any) -> str:
    device_map = getattr(model, "hf_device_map", None) or {}
    for value in device_map.values():
        if isinstance(value, int):
            return f"cuda:{value}"
        if isinstance(value, str) and value not in ("disk",):
            return value
    return str(next(model.parameters()).device)


@contextlib.contextmanager
def _seeded(settings: GenerationSettings, device: torch.device) -> Iterator[None]:
    if not (settings.do_sample and settings.seed is not None):
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        yield


def _load_error(exc: BaseException, ref: ModelRef) -> Exception:
    if isinstance(exc, (UnsupportedCheckpointError, ModelLoadError)):
        return exc
    return explain_load_error(exc, ref)


def upgrade_old_layout(model: Any, processor: Any, label: str) -> bool:
    """Give a checkpoint saved before transformers 4.46 its ``<image>`` placeholders, as its docs describe.

    Sets ``processor.num_query_tokens`` from the model config, makes sure the tokenizer has the
    ``<image>`` token (the processor adds it on load when missing), grows the embeddings to cover it,
    and sets ``config.image_token_index``. Returns whether anything had to change; raises
    UnsupportedCheckpointError when the checkpoint cannot be made to use the image.
    """
    config = model.config
    tokenizer = processor.tokenizer
    changed = False
    num_query = getattr(config, "num_query_tokens", None)
    if not isinstance(num_query, int) or num_query <= 0:
        raise UnsupportedCheckpointError(f"{label} has no num_query_tokens in its config, so its image cannot be used.")
    if getattr(processor, "num_query_tokens", None) != num_query:
        processor.num_query_tokens = num_query
        changed = True
    image_token = getattr(processor, "image_token", None)
    token_text = getattr(image_token, "content", None) or "<image>"
    token_id = tokenizer.convert_tokens_to_ids(token_text)
    if token_id is None or token_id == tokenizer.unk_token_id:
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken(token_text, normalized=False, special=True)], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(token_text)
        changed = True
    embeddings = model.get_input_embeddings()
    if token_id >= embeddings.num_embeddings:
        try:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedCheckpointError(
                f"{label} uses the old BLIP layout without <image> tokens, and its embeddings could not be "
                f"grown to add one ({type(exc).__name__}), so its image cannot be used."
            ) from exc
        changed = True
    if getattr(config, "image_token_index", None) != token_id:
        config.image_token_index = token_id
        changed = True
    if changed:
        log.warning("%s uses the old BLIP layout; upgraded at load time (<image> is token %d).", label, token_id)
    return changed


def keep_qformer_float32(model: Any) -> bool:
    """Keep the Q-Former, its query tokens and the projection in float32, as LAVIS does for every family
    (transformers 5.23 does it for float16 BLIP-2 only). A model whose Q-Former or projection holds
    quantized (bitsandbytes) weights is left as loaded. Returns whether anything changed.

    Cost at the blip2-opt-2.7b size on this CPU: see README "Prompts and decoding" (precision).
    """
    modules = [model.qformer, model.language_projection]
    params = [p for module in modules for p in module.parameters()] + [model.query_tokens]
    if not all(p.is_floating_point() for p in params) or all(p.dtype == torch.float32 for p in params):
        return False
    for module in modules:
        module.to(torch.float32)
        # transformers' own forward hands these modules half-precision inputs (BLIP-2 casts the Q-Former
        # output back to the vision dtype; InstructBLIP's Q-Former does not cast its input)
        module.register_forward_pre_hook(_inputs_to_float32, with_kwargs=True)
    model.query_tokens.data = model.query_tokens.data.float()
    return True


def _inputs_to_float32(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(value: Any) -> Any:
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return tuple(cast(a) for a in args), {key: cast(value) for key, value in kwargs.items()}


# The -coco caption checkpoints were converted with vision image_size 364 (all others: 224).
COCO_IMAGE_SIZE = 364


def _spec_from(model: Any, kind: CheckpointKind, ref: ModelRef, upgraded: bool) -> ModelSpec:
    config = model.config
    text = config.text_config
    if kind.language_model.decoder_only:
        context = int(getattr(text, "max_position_embeddings", None) or 2048)
    else:
        context = int(getattr(text, "n_positions", None) or 512)
    qformer_tokens = None
    if kind.family is Family.INSTRUCTBLIP:
        qformer_tokens = int(getattr(config.qformer_config, "max_position_embeddings", 512))
    if ref.entry is not None:
        style = ref.entry.prompt_style
    elif kind.family is Family.INSTRUCTBLIP:
        style = PromptStyle.INSTRUCTBLIP
    elif getattr(config.vision_config, "image_size", None) == COCO_IMAGE_SIZE:
        style = PromptStyle.BLIP2_COCO  # a local folder or hub id holding a -coco caption checkpoint
    else:
        style = PromptStyle.BLIP2
    return ModelSpec(kind.family, kind.language_model, style, int(config.num_query_tokens), context,
                     qformer_tokens, upgraded)


def _saved_generation_settings(where: str, common: Mapping[str, Any]) -> dict[str, Any]:
    """The values a checkpoint's generation_config.json sets explicitly (differing from the defaults)."""
    try:
        saved = GenerationConfig.from_pretrained(where, **common)
    except (OSError, ValueError):
        return {}
    return saved.to_diff_dict()
