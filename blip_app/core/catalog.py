"""The checkpoints blip_app offers by short name, and how to read any other checkpoint's family.

Plain data, no torch: the UI and the command line list it without loading anything. Behaviour is
chosen from these fields (family, language model, prompt style), never from substrings of a name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from blip_app.core.remote import RemoteTarget, is_remote, parse_remote
from blip_app.errors import UnknownModelError, UnsupportedCheckpointError


class Family(str, Enum):
    """Which vision-language architecture a checkpoint is."""

    BLIP2 = "blip2"
    INSTRUCTBLIP = "instructblip"


class LanguageModel(str, Enum):
    """The frozen language model behind the Q-Former."""

    OPT = "opt"
    FLAN_T5 = "flan-t5"
    VICUNA = "vicuna"

    @property
    def decoder_only(self) -> bool:
        """OPT and Vicuna return the prompt ids before the new ones; Flan-T5 returns only new ids."""
        return self is not LanguageModel.FLAN_T5

    @property
    def gpu_dtype(self) -> str:
        """The half precision each language model was trained for: Flan-T5 breaks in float16."""
        return "bfloat16" if self is LanguageModel.FLAN_T5 else "float16"


class PromptStyle(str, Enum):
    """The prompt formats a checkpoint was trained and evaluated with (see prompts.py)."""

    BLIP2 = "blip2"  # pretrained BLIP-2: captions with no prompt
    BLIP2_COCO = "blip2-coco"  # fine-tuned on COCO captions with the prompt "a photo of"
    INSTRUCTBLIP = "instructblip"  # instruction-tuned: every task is an instruction


# Context limits of the language models (published configs). Flan-T5 uses relative positions and
# was trained with 512 encoder tokens; quality collapses beyond, so 512 is treated as the limit.
DECODER_POSITIONS = 2048
T5_ENCODER_TOKENS = 512
QFORMER_TEXT_TOKENS = 512


@dataclass(frozen=True)
class Architecture:
    """Published sizes of a checkpoint's language model, used by the benchmark to build it at real size."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    vocab: int


@dataclass(frozen=True)
class CatalogEntry:
    """One checkpoint offered by short name."""

    name: str  # short name shown in the UI and accepted by --model
    hub_id: str  # repository on the Hugging Face Hub
    family: Family
    language_model: LanguageModel
    params_billion: float  # whole model, roughly
    prompt_style: PromptStyle
    architecture: Architecture
    description: str  # one line for the model picker

    @property
    def context_tokens(self) -> int:
        """Tokens the language model takes: positions for decoder-only, encoder tokens for Flan-T5."""
        return DECODER_POSITIONS if self.language_model.decoder_only else T5_ENCODER_TOKENS

    def memory_gb(self, precision: str) -> float:
        """Approximate weight memory in GB for a precision: float32, float16, bfloat16, 8bit or 4bit."""
        return round(self.params_billion * BYTES_PER_PARAM[precision], 1)


# int8-cpu: int8 language-model linears, float32 embeddings beside them, the vision side in bfloat16
# (blip2-opt-2.7b: 5.3 GB for 3.74 B parameters).
# int8/int4-weight-only: the language model's linears quantised, the vision side in bfloat16 (blip2-opt-2.7b:
# 1.0 B vision + Q-Former parameters at 2 bytes, 2.7 B at 1 or 0.56 bytes).
BYTES_PER_PARAM = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "8bit": 1.0, "4bit": 0.55, "int8-cpu": 1.45,
                   "int8-weight-only": 1.3, "int4-weight-only": 0.95}

_OPT_2_7B = Architecture(hidden=2560, layers=32, heads=32, mlp=10240, vocab=50272)
_OPT_6_7B = Architecture(hidden=4096, layers=32, heads=32, mlp=16384, vocab=50272)
_T5_XL = Architecture(hidden=2048, layers=24, heads=32, mlp=5120, vocab=32128)
_T5_XXL = Architecture(hidden=4096, layers=24, heads=64, mlp=10240, vocab=32128)
_VICUNA_7B = Architecture(hidden=4096, layers=32, heads=32, mlp=11008, vocab=32000)
_VICUNA_13B = Architecture(hidden=5120, layers=40, heads=40, mlp=13824, vocab=32000)

_B, _I = Family.BLIP2, Family.INSTRUCTBLIP
_OPT, _T5, _VIC = LanguageModel.OPT, LanguageModel.FLAN_T5, LanguageModel.VICUNA
_PLAIN, _COCO, _INSTR = PromptStyle.BLIP2, PromptStyle.BLIP2_COCO, PromptStyle.INSTRUCTBLIP

_ENTRIES = (
    CatalogEntry("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", _B, _OPT, 3.7, _PLAIN, _OPT_2_7B,
                 "BLIP-2 with OPT-2.7b: the classic captioner, smallest of the family"),
    CatalogEntry("blip2-opt-6.7b", "Salesforce/blip2-opt-6.7b", _B, _OPT, 7.8, _PLAIN, _OPT_6_7B,
                 "BLIP-2 with OPT-6.7b"),
    CatalogEntry("blip2-opt-2.7b-coco", "Salesforce/blip2-opt-2.7b-coco", _B, _OPT, 3.7, _COCO, _OPT_2_7B,
                 "BLIP-2 OPT-2.7b fine-tuned on COCO captions"),
    CatalogEntry("blip2-opt-6.7b-coco", "Salesforce/blip2-opt-6.7b-coco", _B, _OPT, 7.8, _COCO, _OPT_6_7B,
                 "BLIP-2 OPT-6.7b fine-tuned on COCO captions"),
    CatalogEntry("blip2-flan-t5-xl", "Salesforce/blip2-flan-t5-xl", _B, _T5, 3.9, _PLAIN, _T5_XL,
                 "BLIP-2 with Flan-T5-XL: good at questions for its size"),
    CatalogEntry("blip2-flan-t5-xxl", "Salesforce/blip2-flan-t5-xxl", _B, _T5, 12.2, _PLAIN, _T5_XXL,
                 "BLIP-2 with Flan-T5-XXL"),
    CatalogEntry("blip2-flan-t5-xl-coco", "Salesforce/blip2-flan-t5-xl-coco", _B, _T5, 3.9, _COCO, _T5_XL,
                 "BLIP-2 Flan-T5-XL fine-tuned on COCO captions"),
    CatalogEntry("instructblip-flan-t5-xl", "Salesforce/instructblip-flan-t5-xl", _I, _T5, 4.0, _INSTR, _T5_XL,
                 "InstructBLIP with Flan-T5-XL: follows instructions"),
    CatalogEntry("instructblip-flan-t5-xxl", "Salesforce/instructblip-flan-t5-xxl", _I, _T5, 12.3, _INSTR, _T5_XXL,
                 "InstructBLIP with Flan-T5-XXL"),
    CatalogEntry("instructblip-vicuna-7b", "Salesforce/instructblip-vicuna-7b", _I, _VIC, 7.9, _INSTR, _VICUNA_7B,
                 "InstructBLIP with Vicuna-7b: the most conversational"),
    CatalogEntry("instructblip-vicuna-13b", "Salesforce/instructblip-vicuna-13b", _I, _VIC, 14.1, _INSTR, _VICUNA_13B,
                 "InstructBLIP with Vicuna-13b"),
)


def _build_index(entries: tuple[CatalogEntry, ...]) -> dict[str, CatalogEntry]:
    index: dict[str, CatalogEntry] = {}
    for entry in entries:
        for key in (entry.name, entry.hub_id.lower()):
            if key in index:
                raise ValueError(f"Duplicate catalog key: {key}")
            index[key] = entry
    return index


CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in _ENTRIES}
_INDEX = _build_index(_ENTRIES)


def catalog_entries() -> list[CatalogEntry]:
    """Every checkpoint offered by short name, in display order."""
    return list(_ENTRIES)


def find_entry(name_or_id: str) -> CatalogEntry | None:
    """The catalog entry for a short name or a Salesforce hub id (any case), else None."""
    return _INDEX.get(name_or_id.strip()) or _INDEX.get(name_or_id.strip().lower())


@dataclass(frozen=True)
class ModelRef:
    """What a model name resolved to: where to load it from, and its catalog entry if it has one."""

    name: str  # as the user gave it (the key the UI and API use)
    source: str  # hub id or absolute folder path handed to from_pretrained
    entry: CatalogEntry | None
    is_local: bool
    remote: RemoteTarget | None = None  # a model another OpenAI-compatible server runs (core/remote.py)

    @property
    def label(self) -> str:
        """A short human label: the catalog name, the remote model and its host, or the folder / hub id."""
        if self.remote is not None:
            return self.remote.label
        return self.entry.name if self.entry else self.name


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return (
        len(parts) == 2
        and all(parts)
        and all(set(part) <= allowed for part in parts)
        and not any(part in (".", "..") for part in parts)
    )


def resolve(name: str) -> ModelRef:
    """Resolve a catalog name, a hub id or a local checkpoint folder; raise UnknownModelError otherwise."""
    text = (name or "").strip()
    if not text:
        raise UnknownModelError("No model was given. Choose one of: " + ", ".join(CATALOG) + ".")
    if is_remote(text):
        target = parse_remote(text)
        return ModelRef(name=text, source=target.base_url, entry=None, is_local=False, remote=target)
    entry = find_entry(text)
    if entry is not None:
        return ModelRef(name=text, source=entry.hub_id, entry=entry, is_local=False)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"The folder {text} has no config.json, so it is not a model checkpoint.")
        return ModelRef(name=text, source=str(path.resolve()), entry=None, is_local=True)
    if _looks_like_hub_id(text) and not path.exists():
        return ModelRef(name=text, source=text, entry=None, is_local=False)
    raise UnknownModelError(
        f"Unknown model: {text}. Use a name from the catalog ({', '.join(CATALOG)}), "
        "a Hugging Face hub id such as Salesforce/blip2-opt-2.7b, or a folder holding a checkpoint."
    )


RETRIEVAL_ARCHITECTURE = "Blip2ForImageTextRetrieval"  # config.json's architectures say a checkpoint matches
MAX_SEARCH_IMAGES = 100  # images one search ranks
MAX_TEXT_CHARS = 2000  # characters of a text the matching model reads

# --------------------------------------------------------------------------------------------------
# The image-text matching checkpoints (models/retrieval.py runs them): plain data, shaped like
# CatalogEntry where the manager reads it (name, hub_id, params_billion, description, family.value).


class RetrievalFamily(str, Enum):
    """The architecture of an image-text matching checkpoint."""

    BLIP2_ITM = "blip2-itm"


@dataclass(frozen=True)
class RetrievalEntry:
    """An image-text matching checkpoint offered by short name."""

    name: str  # short name accepted wherever a model name is
    hub_id: str  # repository on the Hugging Face Hub
    params_billion: float  # whole model: ViT-g 0.99 B + Q-Former and heads 0.19 B
    description: str  # one line for the model list
    family: RetrievalFamily = RetrievalFamily.BLIP2_ITM

    def memory_gb(self, precision: str) -> float:
        """Approximate weight memory in GB for a precision: float32, float16 or bfloat16."""
        return round(self.params_billion * BYTES_PER_PARAM[precision], 1)


_RETRIEVAL_ENTRIES = (
    # 1.17 B: counted from Blip2ForImageTextRetrieval built on the meta device with the published sizes
    # (ViT-g/14: 1408 hidden, 39 layers; Q-Former: BERT-base with cross-attention every 2nd layer,
    # vocabulary 30523; 32 queries; 256-d projections): 1,172,032,258 parameters.
    RetrievalEntry("blip2-itm-vit-g", "Salesforce/blip2-itm-vit-g", 1.17,
                   "BLIP-2 image-text matching (ViT-g + Q-Former, no language model): trust scores and search"),
)

RETRIEVAL_CATALOG: dict[str, RetrievalEntry] = {entry.name: entry for entry in _RETRIEVAL_ENTRIES}
DEFAULT_RETRIEVAL_MODEL = _RETRIEVAL_ENTRIES[0].name


def find_retrieval_entry(name_or_id: str) -> RetrievalEntry | None:
    """The retrieval entry for a short name or hub id (any case), else None."""
    text = (name_or_id or "").strip().lower()
    for entry in _RETRIEVAL_ENTRIES:
        if text in (entry.name, entry.hub_id.lower()):
            return entry
    return None


def resolve_model(name: str) -> ModelRef:
    """Like :func:`resolve`, knowing the image-text matching checkpoints too (the manager's resolver)."""
    entry = find_retrieval_entry(name)
    if entry is not None:
        # ModelRef.entry is typed CatalogEntry; a RetrievalEntry carries the fields the manager reads.
        return ModelRef(name=name.strip(), source=entry.hub_id, entry=entry, is_local=False)  # type: ignore[arg-type]
    return resolve(name)


@dataclass(frozen=True)
class CheckpointKind:
    """What a checkpoint's config.json says it is."""

    family: Family
    language_model: LanguageModel
    text_model_type: str


_FAMILY_BY_MODEL_TYPE = {"blip-2": Family.BLIP2, "instructblip": Family.INSTRUCTBLIP}
_LM_BY_TEXT_TYPE = {"opt": LanguageModel.OPT, "t5": LanguageModel.FLAN_T5, "llama": LanguageModel.VICUNA}


def kind_from_config(config: dict, where: str) -> CheckpointKind:
    """Read family and language model from a parsed config.json; refuse anything else by name."""
    model_type = config.get("model_type")
    family = _FAMILY_BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise UnsupportedCheckpointError(
            f"{where} is a '{model_type}' checkpoint, not BLIP-2 or InstructBLIP; blip_app cannot run it."
        )
    text_type = (config.get("text_config") or {}).get("model_type", "opt")
    language_model = _LM_BY_TEXT_TYPE.get(text_type)
    if language_model is None:
        raise UnsupportedCheckpointError(
            f"{where} pairs {family.value} with a '{text_type}' language model; "
            "blip_app supports OPT, Flan-T5 and Vicuna/LLaMA."
        )
    return CheckpointKind(family, language_model, text_type)


def read_kind(folder: str | Path) -> CheckpointKind:
    """Family and language model of a checkpoint folder, from its config.json (never from its name)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnsupportedCheckpointError(f"Cannot read {path}: {exc}.") from exc
    return kind_from_config(config, str(folder))
