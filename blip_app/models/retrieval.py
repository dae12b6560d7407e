"""Image-text matching with BLIP-2's retrieval head, and the features BLIP-2 models expose.

Two kinds of model are served here:

* :class:`RetrievalModel`: ``Blip2ForImageTextRetrieval`` (Salesforce/blip2-itm-vit-g: the ViT-g vision
  encoder and the first-stage Q-Former with its two heads, no language model). It gives

  - the **ITM** score (image-text matching head): the probability that an image and a text match,
    a softmax over the head's two logits ``[no match, match]`` averaged over the query tokens;
  - the **ITC** similarity (image-text contrastive head): the cosine between the projected, normalised
    text embedding and each of the image's projected query embeddings, the largest one counted;
  - those projected embeddings themselves, for search and for the ``embed`` command.

  The pieces of ``Blip2ForImageTextRetrieval.forward`` are called one by one (transformers 5.23,
  ``models/blip_2/modeling_blip_2.py``, ``forward`` at line 1867: ITM path lines 1951-1979, ITC path
  lines 1980-2012) so that the vision encoder runs once per image content: its output is cached per
  :func:`blip_app.core.images.image_digest`, like the engine caches image features.

* The generative models of the catalog (``Blip2ForConditionalGeneration`` /
  ``InstructBlipForConditionalGeneration`` inside an engine ``LoadedModel``), whose features
  :func:`generative_features` reads: the vision encoder's pooled output, the Q-Former's query outputs,
  and the language model's hidden states for a text.

The retrieval checkpoints are listed in ``core.catalog`` (``RETRIEVAL_CATALOG``), and
``loading.load_model`` picks this class when ``checkpoints.is_matching`` says so (from
``config.json``'s ``architectures``: the retrieval checkpoint has ``model_type`` "blip-2" like the
captioning ones, so the model type alone cannot tell them apart).

The service-level helpers at the end (:func:`trust_score`, :func:`search`, :func:`embed`) take a
service (or a model manager) and hold the model for the length of the call: the UI and the API call
them directly.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from blip_app.core.catalog import (
    DEFAULT_RETRIEVAL_MODEL,
    MAX_SEARCH_IMAGES,
    MAX_TEXT_CHARS,
    RETRIEVAL_ARCHITECTURE,
    RETRIEVAL_CATALOG,
    Family,
    LanguageModel,
    ModelRef,
    RetrievalEntry,
)
from blip_app.core.devices import Hardware, LoadOptions, LoadPlan, plan_load
from blip_app.core.images import image_digest
from blip_app.core.prompts import clean_text
from blip_app.core.settings import Task
from blip_app.errors import BadInputError, BusyError, GenerationError, UnsupportedCheckpointError
from blip_app.models.checkpoints import config_architectures, explain_load_error
from blip_app.models.engine import (
    DEVICE_LOCKS,
    DTYPES,
    FeatureCache,
    LoadedModel,
    exclusive_load,
    qformer_queries,
)
from blip_app.models.hardware import OUT_OF_MEMORY, detect_hardware, free_accelerator_memory

log = logging.getLogger(__name__)

def plan_retrieval_load(options: LoadOptions, hardware: Hardware) -> LoadPlan:
    """Device and dtype for the retrieval model: float16 on a GPU, bfloat16 on a CPU with bf16, else float32.

    It has no language model, so the Flan-T5 float16 caveat never applies; those are exactly the rules
    devices.plan_load gives an OPT model, whose device checks and notes are reused. It is small
    (1.2 B parameters) and is never quantised.
    """
    notes: tuple[str, ...] = ()
    if options.quantization != "none":
        notes = (f"The image-text matching model is small and is not quantised ({options.quantization} applies "
                 "to the captioning models only).",)
        options = replace(options, quantization="none")
    plan = plan_load(LanguageModel.OPT, options, hardware)
    return replace(plan, notes=plan.notes + notes)


# --------------------------------------------------------------------------------------------------
# Confidence in words.

# Lower bounds of the ITM match probability for each label, highest first. The ITM head is trained as a
# binary classifier (LAVIS, BLIP-2 stage 1), so 0.5 is its own decision boundary; "very likely" asks for
# 0.8 or more, and below 0.2 the head is fairly sure the text does not describe the image. (The
# "73.0%" in transformers' Blip2ForImageTextRetrieval docstring is a double softmax: e / (1 + e) =
# 0.731 is what a probability of about 1.0 becomes when softmaxed again. Scores here are one softmax.)
CONFIDENCE_THRESHOLDS: tuple[tuple[float, str], ...] = (
    (0.8, "very likely"),
    (0.5, "likely"),
    (0.2, "uncertain"),
    (0.0, "unlikely"),
)


def confidence_label(score: float) -> str:
    """Plain words for an ITM match probability: very likely (>= 0.8), likely (>= 0.5), uncertain (>= 0.2), unlikely."""
    if not isinstance(score, (int, float)) or math.isnan(score):
        raise ValueError(f"A match probability must be a number, not {score!r}.")
    for bound, label in CONFIDENCE_THRESHOLDS:
        if score >= bound:
            return label
    return CONFIDENCE_THRESHOLDS[-1][1]


@dataclass(frozen=True)
class Trust:
    """How well an image matches a text, by the image-text matching head."""

    score: float  # probability of a match, 0..1
    label: str  # confidence_label(score)
    model: str  # the retrieval model that judged it

    @property
    def hover(self) -> str:
        """The number behind the words, for a tooltip."""
        return f"image-text match probability {self.score:.2f} ({self.model})"

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the API and exports."""
        return {"score": round(self.score, 4), "label": self.label, "model": self.model}


def make_trust(score: float, model: str) -> Trust:
    """A Trust for a probability."""
    return Trust(float(score), confidence_label(score), model)


def trust_text(task: Task | str, question: str, answer: str) -> str:
    """The text the matching head scores for a reply: the caption itself, or question and answer together.

    The head was trained on captions; an answer alone ("yes", "two") says nothing about the image, so
    the question is put before it. A right "no" about something absent therefore scores low: the
    score tells how well the text matches the picture, not whether the answer is right.
    """
    answer = (answer or "").strip()
    if Task(task) is Task.CAPTION or not (question or "").strip():
        return answer
    return f"{question.strip()} {answer}".strip()


# --------------------------------------------------------------------------------------------------
# The retrieval model.

_CHUNK = 16  # images through the vision encoder (or ITM Q-Former) at once


@contextlib.contextmanager
def _device_lock(device: str, lock_timeout: float | None) -> Iterator[None]:
    lock = DEVICE_LOCKS.get(device)
    if not lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout):
        raise BusyError("The model is busy with other requests; please try again in a moment.")
    try:
        with torch.inference_mode():
            yield
    except OUT_OF_MEMORY as exc:
        free_accelerator_memory()
        raise GenerationError("The image-text matching model ran out of memory. Try fewer images at once.") from exc
    finally:
        lock.release()


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float32).clone()


class RetrievalModel:
    """``Blip2ForImageTextRetrieval`` in memory: ITM scores, ITC similarities, projected embeddings, ranking.

    Every public method takes the device lock for its whole run and returns float32 CPU values.
    """

    kind = "retrieval"

    def __init__(self, name: str, model: Any, processor: Any, plan: LoadPlan, *, feature_cache_size: int = 128,
                 lock_timeout: float | None = None) -> None:
        self.name = name
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.plan = plan
        self.features = FeatureCache(feature_cache_size)  # the manager clears it when parking or freeing
        self.device = torch.device(plan.device)
        self.vision_dtype = next(model.vision_model.parameters()).dtype
        self.num_query_tokens = int(model.config.num_query_tokens)
        self.max_text_tokens = int(model.config.qformer_config.max_position_embeddings)
        self.lock_timeout = lock_timeout

    @property
    def cache_bytes(self) -> int:
        """Bytes of the cached image features (the manager counts them in its memory budget)."""
        return self.features.nbytes

    def clear_caches(self) -> None:
        """Drop the cached image features (parked, freed)."""
        self.features.clear()

    @classmethod
    def load(cls, ref: ModelRef, options: LoadOptions = LoadOptions(), *, hardware: Hardware | None = None,
             source: str | None = None, **model_options: Any) -> RetrievalModel:
        """Load an image-text matching checkpoint (from ``source`` if given: a local snapshot of ``ref``)."""
        from transformers import AutoProcessor, Blip2ForImageTextRetrieval

        where = source or ref.source
        common: dict[str, Any] = {"revision": options.revision, "cache_dir": options.cache_dir,
                                  "local_files_only": options.local_files_only}
        if source is not None:
            common = {"local_files_only": True}
        architectures = config_architectures(ref, options, source)
        if RETRIEVAL_ARCHITECTURE not in architectures:
            raise UnsupportedCheckpointError(
                f"{ref.label} is a {', '.join(architectures) or 'model without architectures'} checkpoint, "
                f"not an image-text matching one ({RETRIEVAL_ARCHITECTURE}), so it cannot give trust scores."
            )
        plan = plan_retrieval_load(options, hardware or detect_hardware())
        for note in plan.notes:
            log.warning("%s: %s", ref.label, note)
        try:
            with exclusive_load():  # transformers changes process-wide state while loading (see engine)
                processor = AutoProcessor.from_pretrained(where, **common)
                model = Blip2ForImageTextRetrieval.from_pretrained(
                    where, dtype=DTYPES[plan.dtype], device_map=plan.device_map, **common
                )
        except Exception as exc:  # noqa: BLE001 - every cause is explained
            raise explain_load_error(exc, ref) from exc
        model.eval()
        log.info("Loaded %s (image-text matching, %s on %s)", ref.label, plan.precision_label, plan.device)
        return cls(ref.name, model, processor, plan, **model_options)

    # ---------------------------------------------------------------- inputs

    def _texts(self, texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        return [clean_text(text, what="text", max_chars=MAX_TEXT_CHARS) for text in texts]

    def _tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-Former token ids and mask; no image placeholders (the forward strips them before use)."""
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens,
                                 return_tensors="pt")
        return encoded.input_ids.to(self.device), encoded.attention_mask.to(self.device)

    def _vision(self, images: Sequence[Image.Image], keys: Sequence[str]) -> list[torch.Tensor]:
        """The vision encoder's last hidden state per image (1 x patches x hidden), cached per image content."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, Image.Image] = {}  # the same picture twice is encoded once
        for key, image in zip(keys, images):
            if key in found or key in missing:
                continue
            cached = self.features.get((key, "vision"))
            if cached is not None:
                found[key] = cached
            else:
                missing[key] = image
        pending = list(missing.items())
        for start in range(0, len(pending), _CHUNK):
            chunk = pending[start:start + _CHUNK]
            pixels = self.processor.image_processor(images=[image for _, image in chunk], return_tensors="pt")
            pixel_values = pixels.pixel_values.to(self.device, self.vision_dtype)
            hidden = self.model.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
            for row, (key, _) in enumerate(chunk):
                found[key] = hidden[row:row + 1]
                self.features.put((key, "vision"), found[key])
        return [found[key] for key in keys]

    def _queries(self, vision: torch.Tensor) -> torch.Tensor:
        """The Q-Former's query outputs for vision states (N x queries x hidden), without text."""
        return qformer_queries(self.model, vision)

    def _image_embeds(self, images: Sequence[Image.Image], keys: Sequence[str]) -> torch.Tensor:
        """Projected, normalised query embeddings per image (N x queries x dim), cached per image content."""
        rows: list[torch.Tensor | None] = [self.features.get((key, "itc")) for key in keys]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:
            vision = self._vision([images[i] for i in todo], [keys[i] for i in todo])
            for start in range(0, len(todo), _CHUNK):
                part = todo[start:start + _CHUNK]
                queries = self._queries(torch.cat(vision[start:start + len(part)]))
                queries = queries.to(self.model.vision_projection.weight.dtype)
                embeds = torch.nn.functional.normalize(self.model.vision_projection(queries), dim=-1)
                for row, index in enumerate(part):
                    rows[index] = embeds[row:row + 1]
                    self.features.put((keys[index], "itc"), rows[index])
        return torch.cat(rows)  # type: ignore[arg-type]

    def _text_states(self, texts: Sequence[str]) -> torch.Tensor:
        """The Q-Former's text-only output at the [CLS] position (N x hidden)."""
        ids, mask = self._tokens(texts)
        embeds = self.model.embeddings(input_ids=ids)
        states = self.model.qformer(query_embeds=embeds, query_length=0, attention_mask=mask,
                                    return_dict=True).last_hidden_state
        return states[:, 0, :]

    def _text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        states = self._text_states(texts).to(self.model.text_projection.weight.dtype)
        return torch.nn.functional.normalize(self.model.text_projection(states), dim=-1)

    def _itm(self, vision: Sequence[torch.Tensor], texts: Sequence[str]) -> list[float]:
        """Match probabilities for paired vision states and texts (the ITM path of the forward)."""
        model = self.model
        scores: list[float] = []
        for start in range(0, len(texts), _CHUNK):
            states = torch.cat(list(vision[start:start + _CHUNK]))
            ids, mask = self._tokens(texts[start:start + _CHUNK])
            query_tokens = model.query_tokens.expand(states.shape[0], -1, -1)
            query_mask = torch.ones(query_tokens.size()[:-1], dtype=torch.long, device=states.device)
            embeds = model.embeddings(input_ids=ids, query_embeds=query_tokens)
            image_mask = torch.ones(states.size()[:-1], dtype=torch.long, device=states.device)
            hidden = model.qformer(query_embeds=embeds, query_length=query_tokens.shape[1],
                                   attention_mask=torch.cat([query_mask, mask], dim=1),
                                   encoder_hidden_states=states, encoder_attention_mask=image_mask,
                                   return_dict=True).last_hidden_state
            hidden = hidden.to(model.itm_head.weight.dtype)
            logits = model.itm_head(hidden[:, : query_tokens.shape[1], :]).mean(dim=1)
            scores.extend(float(p) for p in logits.float().softmax(dim=-1)[:, 1])
        return scores

    # ---------------------------------------------------------------- public

    def itm_scores(self, images: Sequence[Image.Image], texts: Sequence[str] | str) -> list[float]:
        """Match probabilities (0..1) for image/text pairs; one text is paired with every image."""
        images = list(images)
        texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
        if len(texts) == 1 and len(images) > 1:
            texts = texts * len(images)
        if len(images) == 1 and len(texts) > 1:
            images = images * len(texts)
        if len(images) != len(texts):
            raise ValueError(f"itm_scores pairs images with texts: got {len(images)} images and {len(texts)} texts")
        if not images:
            return []
        texts = self._texts(texts)
        keys = [image_digest(image) for image in images]
        with _device_lock(self.plan.device, self.lock_timeout):
            return self._itm(self._vision(images, keys), texts)

    def itm_score(self, image: Image.Image, text: str) -> float:
        """The probability that ``text`` describes ``image``: softmax over the ITM head's [no match, match] logits."""
        return self.itm_scores([image], [text])[0]

    def itc_matrix(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """Contrastive similarities, images x texts: for each pair the best cosine over the image's queries."""
        image_embeds = self.embed_images(images)
        text_embeds = self.embed_texts(texts)
        return torch.einsum("iqd,td->itq", image_embeds, text_embeds).amax(dim=-1)

    def itc_similarity(self, image: Image.Image, text: str) -> float:
        """The contrastive similarity of one image and one text (a cosine, -1..1, not a probability)."""
        return float(self.itc_matrix([image], [text])[0, 0])

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The retrieval head's projected, normalised image embeddings: N x queries x dim (32 x 256 for ViT-g)."""
        images = list(images)
        if not images:
            return torch.empty(0, self.num_query_tokens, int(self.model.config.image_text_hidden_size))
        keys = [image_digest(image) for image in images]
        with _device_lock(self.plan.device, self.lock_timeout):
            return _cpu(self._image_embeds(images, keys))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """The retrieval head's projected, normalised text embeddings: N x dim (256 for blip2-itm-vit-g)."""
        texts = self._texts(texts)
        if not texts:
            return torch.empty(0, int(self.model.config.image_text_hidden_size))
        with _device_lock(self.plan.device, self.lock_timeout):
            return _cpu(self._text_embeds(texts))

    def rank(self, images: Sequence[Image.Image], query: str, *, method: str = "itm") -> list[tuple[int, float]]:
        """Images ordered by how well they match ``query``, best first: (index, score) pairs.

        ``method`` "itm" scores with the matching head (a probability); "itc" with the contrastive
        similarity (a cosine; faster on large sets since image embeddings are cached). Ties keep input order.
        """
        images = list(images)
        if method == "itm":
            scores = self.itm_scores(images, query) if images else []
        elif method == "itc":
            scores = self.itc_matrix(images, [query])[:, 0].tolist() if images else []
        else:
            raise ValueError(f"Unknown ranking method {method!r}; use 'itm' or 'itc'.")
        return sorted(enumerate(scores), key=lambda pair: (-pair[1], pair[0]))

    def image_features(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """Every image feature this model has: vision pooled output, Q-Former queries, projected embeddings."""
        key = image_digest(image)
        with _device_lock(self.plan.device, self.lock_timeout):
            vision = self._vision([image], [key])[0]
            pooled = self.model.vision_model.post_layernorm(vision[:, 0, :])  # = Blip2VisionModel's pooler_output
            return {
                "image": _cpu(pooled[0]),
                "qformer": _cpu(self._queries(vision)[0]),
                "itc-image": _cpu(self._image_embeds([image], [key])[0]),
            }

    def text_features(self, text: str) -> dict[str, torch.Tensor]:
        """Every text feature this model has: the Q-Former's [CLS] output and the projected embedding."""
        texts = self._texts([text])
        with _device_lock(self.plan.device, self.lock_timeout):
            states = self._text_states(texts)
            projected = torch.nn.functional.normalize(
                self.model.text_projection(states.to(self.model.text_projection.weight.dtype)), dim=-1)
            return {"qformer-text": _cpu(states[0]), "itc-text": _cpu(projected[0])}


# --------------------------------------------------------------------------------------------------
# Features of the generative models.


@torch.inference_mode()
def _generative_image(loaded: LoadedModel, image: Image.Image, instruction: str) -> dict[str, torch.Tensor]:
    vision = loaded.model.vision_model(pixel_values=loaded.pixel_values(image), return_dict=True)
    # InstructBLIP's Q-Former reads the instruction too, exactly as when the model answers it.
    text = instruction if loaded.spec.family is Family.INSTRUCTBLIP else None
    queries = loaded.query_outputs(vision.last_hidden_state, text)
    return {"image": _cpu(vision.pooler_output[0]), "qformer": _cpu(queries[0])}


@torch.inference_mode()
def _generative_text(loaded: LoadedModel, text: str) -> dict[str, torch.Tensor]:
    # As Blip2Model.get_text_features does (modeling_blip_2.py:996): the decoder's last hidden states for
    # OPT / LLaMA, the encoder's for Flan-T5. Blip2ForConditionalGeneration and InstructBLIP lack the method.
    encoded = loaded.tokenizer(text, truncation=True, max_length=loaded.spec.context_tokens, return_tensors="pt")
    ids, mask = encoded.input_ids.to(loaded.device), encoded.attention_mask.to(loaded.device)
    language_model = loaded.model.language_model
    if loaded.spec.decoder_only:
        states = language_model.base_model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
    else:
        states = language_model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
    return {"text": _cpu(states[0])}


def generative_features(loaded: LoadedModel, image: Image.Image | None = None, text: str | None = None, *,
                        instruction: str = "", lock_timeout: float | None = None) -> dict[str, torch.Tensor]:
    """Features of a captioning model for an image and/or a text, as float32 CPU tensors.

    * ``image``: the vision encoder's pooled output (its [CLS] token after the final layer norm; 1408-d
      for ViT-g);
    * ``qformer``: the Q-Former's query outputs (queries x 768), which the model projects into the
      language model; InstructBLIP's depend on ``instruction`` (empty by default);
    * ``text``: the language model's last hidden states for ``text`` (tokens x hidden): the decoder's
      for OPT and Vicuna, the encoder's for Flan-T5.
    """
    if image is None and text is None:
        raise BadInputError("Give an image or a text to compute features of.")
    result: dict[str, torch.Tensor] = {}
    with _device_lock(loaded.plan.device, lock_timeout):
        if image is not None:
            result.update(_generative_image(loaded, image, instruction))
        if text is not None:
            result.update(_generative_text(loaded, text))
    return result


# --------------------------------------------------------------------------------------------------
# Service-level calls for the UI, the API and the command line.

KIND_HELP = {
    "image": "vision encoder pooled output",
    "qformer": "Q-Former query outputs",
    "text": "language model hidden states",
    "qformer-text": "Q-Former text [CLS] output",
    "itc-image": "retrieval head image embeddings (projected, normalised)",
    "itc-text": "retrieval head text embedding (projected, normalised)",
}


@dataclass(frozen=True, eq=False)
class Embedding:
    """One feature of one input: a vector, or one row per query / token."""

    kind: str  # a key of KIND_HELP
    model: str
    source: str  # the file name or the text
    values: torch.Tensor  # float32 on the CPU: (dim,) or (rows, dim)

    @property
    def pooled(self) -> torch.Tensor:
        """The vector itself, or the mean of the rows."""
        return self.values if self.values.dim() == 1 else self.values.mean(dim=0)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``values``."""
        return tuple(self.values.shape)

    @property
    def norm(self) -> float:
        """Euclidean norm of ``pooled``."""
        return float(self.pooled.norm())

    def as_dict(self, *, full: bool = True) -> dict[str, Any]:
        """Plain data: kind, model, input, shape, norm and the vector (and every row when ``full``)."""
        data: dict[str, Any] = {
            "kind": self.kind, "description": KIND_HELP.get(self.kind, self.kind), "model": self.model,
            "input": self.source, "shape": list(self.shape), "norm": round(self.norm, 6),
            "pooling": "none" if self.values.dim() == 1 else f"mean of {self.shape[0]} rows",
            "vector": [round(float(v), 6) for v in self.pooled],
        }
        if full and self.values.dim() == 2:
            data["rows"] = [[round(float(v), 6) for v in row] for row in self.values]
        return data


@dataclass(frozen=True)
class SearchHit:
    """One image in a search result."""

    index: int  # position in the list given
    name: str
    score: float  # ITM match probability: the ranking key
    label: str  # confidence_label(score)
    similarity: float  # ITC cosine, for reference

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the API."""
        return {"index": self.index, "name": self.name, "score": round(self.score, 4), "label": self.label,
                "similarity": round(self.similarity, 4)}




def _manager(service_or_manager: Any) -> Any:
    return getattr(service_or_manager, "manager", service_or_manager)


def _image(source: Any) -> Image.Image:
    if source is None:
        from blip_app.errors import BadImageError

        raise BadImageError("No image was given. Please upload an image first.")
    if isinstance(source, Image.Image):
        return source
    from blip_app.core.images import load_image

    return load_image(source)


def _retrieval(loaded: Any, name: str) -> RetrievalModel:
    if not isinstance(loaded, RetrievalModel):
        raise BadInputError(f"{name} is a captioning model, not an image-text matching one; "
                            f"use {DEFAULT_RETRIEVAL_MODEL} for trust scores and search.")
    return loaded


def trust_scores(service: Any, model: str, image: Any, texts: Sequence[str]) -> list[Trust | None]:
    """Trust for several texts about one image (None for an empty text), in one pass of the model."""
    image = _image(image)
    wanted = [i for i, text in enumerate(texts) if (text or "").strip()]
    result: list[Trust | None] = [None] * len(texts)
    if not wanted:
        return result
    with _manager(service).use(model) as loaded:
        scores = _retrieval(loaded, model).itm_scores([image], [texts[i] for i in wanted])
    for index, score in zip(wanted, scores):
        result[index] = make_trust(score, model)
    return result


def trust_score(service: Any, model: str, image: Any, text: str) -> Trust:
    """How well ``text`` (a caption, or see :func:`trust_text`) matches ``image``, by the retrieval model ``model``."""
    trust = trust_scores(service, model, image, [text])[0]
    if trust is None:
        raise BadInputError("There is no text to score yet.")
    return trust


def search(service: Any, model: str, images: Sequence[Any], query: str, *,
           names: Sequence[str] | None = None) -> list[SearchHit]:
    """Rank images by how well they match ``query`` (ITM probability, best first).

    ``images`` are files, PIL images, or functions that decode one. They are decoded one at a time, each
    when its turn comes, and let go once its features are computed (the features are what the model
    keeps): a hundred 40-megapixel photos never sit in memory together. A function that returns None
    leaves its image out of the ranking (the caller has noted why).
    """
    if not images:
        raise BadInputError("Add some images to search first.")
    if len(images) > MAX_SEARCH_IMAGES:
        raise BadInputError(f"{len(images)} images were given; search takes at most {MAX_SEARCH_IMAGES} at once.")
    query = clean_text(query, what="search text", max_chars=MAX_TEXT_CHARS)
    names = list(names) if names is not None else [_name(image, i) for i, image in enumerate(images)]
    ranked: list[tuple[int, float, float]] = []
    with _manager(service).use(model) as loaded:
        retrieval = _retrieval(loaded, model)
        for index, source in enumerate(images):
            picture = source() if callable(source) else source
            if picture is None:
                continue
            picture = _image(picture)
            score = retrieval.itm_scores([picture], [query])[0]
            similarity = float(retrieval.itc_matrix([picture], [query])[0, 0])
            del picture  # only its features (in the model's cache) outlive this step
            ranked.append((index, score, similarity))
    ranked.sort(key=lambda hit: (-hit[1], hit[0]))
    return [SearchHit(i, names[i], score, confidence_label(score), similarity) for i, score, similarity in ranked]


def _name(source: Any, index: int) -> str:
    if isinstance(source, (str, Path)):
        return Path(source).name
    filename = getattr(source, "filename", None)
    return Path(filename).name if filename else f"image {index + 1}"


def embed(service: Any, model: str, items: Sequence[Any], *, names: Sequence[str] | None = None,
          instruction: str = "") -> list[Embedding]:
    """The features ``model`` gives for each item: a str is a text, anything else an image (file or PIL).

    A retrieval model gives ``image``, ``qformer``, ``itc-image`` for an image and ``qformer-text``,
    ``itc-text`` for a text; a captioning model gives ``image``, ``qformer`` and ``text`` (see
    :func:`generative_features`).
    """
    if not items:
        raise BadInputError("Give at least one image or text to embed.")
    names = list(names) if names is not None else [
        item if isinstance(item, str) else _name(item, i) for i, item in enumerate(items)]
    inputs: list[Image.Image | str] = [
        clean_text(item, what="text", max_chars=MAX_TEXT_CHARS) if isinstance(item, str) else _image(item)
        for item in items]
    result: list[Embedding] = []
    with _manager(service).use(model) as loaded:
        for item, name in zip(inputs, names):
            if isinstance(loaded, RetrievalModel):
                features = loaded.text_features(item) if isinstance(item, str) else loaded.image_features(item)
            elif isinstance(item, str):
                features = generative_features(loaded, text=item)
            else:
                features = generative_features(loaded, image=item, instruction=instruction)
            result.extend(Embedding(kind, model, name, values) for kind, values in features.items())
    return result


__all__ = [
    "CONFIDENCE_THRESHOLDS",
    "DEFAULT_RETRIEVAL_MODEL",
    "Embedding",
    "KIND_HELP",
    "RETRIEVAL_CATALOG",
    "RetrievalEntry",
    "RetrievalModel",
    "SearchHit",
    "Trust",
    "confidence_label",
    "embed",
    "generative_features",
    "make_trust",
    "plan_retrieval_load",
    "search",
    "trust_score",
    "trust_scores",
    "trust_text",
]
