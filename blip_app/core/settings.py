"""Generation settings: defaults per family and task, presets, explicit overrides, and their validation.

Layering, lowest first: the reference decoding of the model's family for the task (see
:func:`task_defaults`); the preset; for the ``standard`` preset, the decoding settings the checkpoint
saved in its generation_config.json; then the caller's explicit overrides. Every value is validated
against a range and the server's caps, with a message naming the bad value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import Any

from blip_app.core.catalog import Family, LanguageModel
from blip_app.errors import SettingsError


class Task(str, Enum):
    """What is asked of the model."""

    CAPTION = "caption"
    ANSWER = "answer"
    CHAT = "chat"


class Preset(str, Enum):
    """Named decoding recipes."""

    STANDARD = "standard"  # the reference decoding of the family and task (or the checkpoint's saved settings)
    FAST = "fast"  # greedy: quickest, and the answer streams as it is written
    DETAILED = "detailed"  # longer, less repetitive output


PRESET_HELP = {
    Preset.STANDARD: "Beam search with the reference settings of the model's family (LAVIS, the model cards).",
    Preset.FAST: "Greedy decoding: the quickest, and the answer appears word by word.",
    Preset.DETAILED: "Longer, more descriptive output with a repetition penalty.",
}


@dataclass(frozen=True)
class GenerationSettings:
    """Fully resolved decoding settings for one request."""

    max_new_tokens: int = 30
    min_new_tokens: int = 1
    num_beams: int = 5
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    seed: int | None = None

    @property
    def streams(self) -> bool:
        """Whether tokens can be shown as they are generated (beam search cannot)."""
        return self.num_beams == 1

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate()``; every value explicit (the checkpoint's config is not read).

        At least one new token: an answer never comes back empty because the first token was a stop
        token (LAVIS generates with min_length 1).
        """
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": min(max(1, self.min_new_tokens), self.max_new_tokens),
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.num_beams > 1:  # early_stopping stays transformers' default (False), as in LAVIS
            kwargs["length_penalty"] = self.length_penalty
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            kwargs["top_p"] = self.top_p
        return kwargs

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for exports and the API."""
        return asdict(self)


SETTING_NAMES = tuple(f.name for f in fields(GenerationSettings))

@dataclass(frozen=True)
class ModelTraits:
    """What the reference decoding of a model depends on: its family, its language model, COCO tuning."""

    family: Family = Family.BLIP2
    language_model: LanguageModel = LanguageModel.OPT
    coco: bool = False  # a -coco caption checkpoint


def task_defaults(task: Task, traits: ModelTraits = ModelTraits(), *, short: bool = False) -> GenerationSettings:
    """The decoding the references use for a family and task (README "Prompts and decoding" has the sources).

    InstructBLIP (model card; LAVIS ``blip2_*_instruct.generate``): beams 5, up to 256 new tokens,
    repetition penalty 1.5, length penalty 1 for free-form answers and chat; captions as LAVIS
    evaluates them (10 to 80 tokens); 10 tokens and length penalty -1 only with the short-answer
    template (LAVIS ``predict_answers``). BLIP-2 (LAVIS ``blip2_opt`` / ``blip2_t5``): captions with
    beams 5, at most 30 tokens, at least 1 (the -coco checkpoints: at least 8, their caption
    evaluation); answers as ``predict_answers`` (10 tokens; length penalty 0 on OPT, -1 on Flan-T5);
    chat as ``generate`` (30 tokens, length penalty 1). LAVIS applies the repetition penalty to the
    generated tokens only; the engine does too.
    """
    base = GenerationSettings(max_new_tokens=30, min_new_tokens=1, num_beams=5, top_p=0.9,
                              repetition_penalty=1.0, length_penalty=1.0)
    if traits.family is Family.INSTRUCTBLIP:
        instruct = replace(base, repetition_penalty=1.5)
        if task is Task.ANSWER and short:
            return replace(instruct, max_new_tokens=10, length_penalty=-1.0)
        if task is Task.CAPTION:
            return replace(instruct, max_new_tokens=80, min_new_tokens=10)
        return replace(instruct, max_new_tokens=256)
    if task is Task.CAPTION:
        return replace(base, min_new_tokens=8) if traits.coco else base
    if task is Task.ANSWER:
        return replace(base, max_new_tokens=10,
                       length_penalty=-1.0 if traits.language_model is LanguageModel.FLAN_T5 else 0.0)
    return base


def preset_settings(task: Task, preset: Preset, traits: ModelTraits = ModelTraits(), *,
                    short: bool = False) -> GenerationSettings:
    """The settings a preset gives a task on a model, before the checkpoint's and the caller's."""
    base = task_defaults(task, traits, short=short)
    if preset is Preset.FAST:
        return replace(base, num_beams=1)
    if preset is Preset.DETAILED:
        return replace(base, max_new_tokens=256, min_new_tokens=16, repetition_penalty=1.5, length_penalty=1.0)
    return base


@dataclass(frozen=True)
class Limits:
    """Server-side caps: a client can ask for less, never for more."""

    max_new_tokens: int = 512
    num_beams: int = 8


# (low, high, type) per setting; bounds are inclusive unless named in _OPEN_LOW.
RANGES: dict[str, tuple[float, float, type]] = {
    "max_new_tokens": (1, math.inf, int),
    "min_new_tokens": (0, math.inf, int),
    "num_beams": (1, math.inf, int),
    "temperature": (0.0, 5.0, float),
    "top_p": (0.0, 1.0, float),
    "repetition_penalty": (0.5, 5.0, float),
    "length_penalty": (-5.0, 5.0, float),
    "seed": (0, 2**32 - 1, int),
}
_OPEN_LOW = {"temperature", "top_p"}


def _coerce(name: str, value: Any) -> Any:
    if name == "do_sample":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise SettingsError(f"do_sample must be true or false, not {value!r}.")
    low, high, kind = RANGES[name]
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, not {str(value)[:40]!r}.") from None
    if math.isnan(number) or math.isinf(number):
        raise SettingsError(f"{name} must be a finite number, not {value!r}.")
    if kind is int:
        if number != int(number):
            raise SettingsError(f"{name} must be a whole number, not {value!r}.")
        number = int(number)
    too_low = number <= low if name in _OPEN_LOW else number < low
    if too_low or number > high:
        bound = f"above {low:g}" if name in _OPEN_LOW else f"at least {low:g}"
        upper = "" if math.isinf(high) else f" and at most {high:g}"
        raise SettingsError(f"{name} must be {bound}{upper}; got {value!r}.")
    return number


# Keys of a checkpoint's generation_config.json that the standard preset takes over.
_CHECKPOINT_KEYS = ("max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_p",
                    "repetition_penalty", "length_penalty")


def resolve_settings(
    task: Task | str,
    preset: Preset | str = Preset.STANDARD,
    overrides: Mapping[str, Any] | None = None,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    limits: Limits = Limits(),
    traits: ModelTraits = ModelTraits(),
    short: bool = False,
) -> GenerationSettings:
    """Validated settings for a request: the model's task defaults and preset, then the checkpoint's
    (standard preset only), then overrides.

    ``overrides`` values of None mean "not set". ``checkpoint`` holds only the values a checkpoint's
    generation_config.json sets explicitly (see engine). ``traits`` and ``short`` choose the reference
    decoding (:func:`task_defaults`). Raises SettingsError naming the bad value.
    """
    try:
        task = Task(task)
    except ValueError:
        raise SettingsError(f"Unknown task {task!r}; use one of: {', '.join(t.value for t in Task)}.") from None
    try:
        preset = Preset(preset or Preset.STANDARD)
    except ValueError:
        raise SettingsError(f"Unknown preset {preset!r}; use one of: {', '.join(p.value for p in Preset)}.") from None
    settings = preset_settings(task, preset, traits, short=short)
    if checkpoint and preset is Preset.STANDARD:
        saved = {k: checkpoint[k] for k in _CHECKPOINT_KEYS if checkpoint.get(k) is not None}
        try:
            settings = replace(settings, **{k: _coerce(k, v) for k, v in saved.items()})
        except SettingsError:
            pass  # a checkpoint's odd value never blocks a request; the preset stands
    changes: dict[str, Any] = {}
    for name, value in (overrides or {}).items():
        if name not in SETTING_NAMES:
            raise SettingsError(f"Unknown generation setting {name!r}; known: {', '.join(SETTING_NAMES)}.")
        if value is None or value == "":
            continue
        changes[name] = _coerce(name, value)
    settings = replace(settings, **changes)
    if settings.max_new_tokens > limits.max_new_tokens:
        raise SettingsError(
            f"max_new_tokens is {settings.max_new_tokens:,}; this server allows at most {limits.max_new_tokens:,}."
        )
    if settings.num_beams > limits.num_beams:
        raise SettingsError(f"num_beams is {settings.num_beams:,}; this server allows at most {limits.num_beams:,}.")
    if settings.min_new_tokens > settings.max_new_tokens:
        if "min_new_tokens" in changes:
            raise SettingsError(
                f"min_new_tokens ({settings.min_new_tokens:,}) is larger than max_new_tokens "
                f"({settings.max_new_tokens:,})."
            )
        settings = replace(settings, min_new_tokens=settings.max_new_tokens)
    return settings
