"""Prompt text for every task and family, and fitting a conversation into the model's context.

Pure functions over plain data: no torch, no tokenizer of their own. The engine passes a token
counter and a budget; these functions decide the words.

Formats (the ones each family was trained and evaluated with; sources in README "Prompts and decoding"):

=============  ============================  =================================  ============================
task           BLIP-2                        BLIP-2 -coco                       InstructBLIP
=============  ============================  =================================  ============================
caption        "" (no prompt)                "a photo of"                       "A short image caption."
detailed       "" (decoding does the rest)   "a photo of"                       "Write a detailed description
                                                                                of the image."
answer         "Question: {q} Answer:"       same                               "{q}"
short answer   "Question: {q} Short answer:" same                               "Question: {q} Short answer:"
chat           past turns "Question: {q} Answer: {a}." joined by spaces, then "Question: {q} Answer:"
=============  ============================  =================================  ============================

InstructBLIP chat: the first turn is exactly the VQA instruction (the bare question), so a one-turn
chat and a question give the same answer. Later turns put the earlier turns before the new question in
the BLIP-2 transcript form above: the language model needs the words said, and "Question: / Answer:"
is one of the VQA templates InstructBLIP was instruction-tuned with, while the trailing "Answer:"
keeps it from continuing the transcript.

InstructBLIP's Q-Former reads the same text as the language model, for every task and every turn, as
transformers' InstructBlipProcessor and LAVIS do (the engine cuts it from the left to 128 Q-Former
tokens, as LAVIS does, so the newest question is never cut). The visual tokens of a conversation
therefore follow its newest question, and a chat turn on InstructBLIP cannot reuse the key/value cache
of the turns before it: quality first.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blip_app.core.catalog import PromptStyle
from blip_app.errors import BadInputError, PromptTooLongError

INSTRUCT_CAPTION = "A short image caption."  # LAVIS caption evaluation prompt
INSTRUCT_DETAILED = "Write a detailed description of the image."
COCO_PREFIX = "a photo of"


@dataclass(frozen=True)
class Turn:
    """One finished exchange of a conversation."""

    question: str
    answer: str


@dataclass(frozen=True)
class PromptPlan:
    """What to send: the language model's text (InstructBLIP's Q-Former reads it too), and what was dropped."""

    text: str  # the language model's prompt; the image tokens go before it
    kept_turns: int = 0
    dropped_turns: int = 0
    notes: tuple[str, ...] = ()  # what the person should know about how the request was fitted


# Control characters other than tab and newline are removed; everything else is kept as typed.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t]+")


def clean_text(text: str | None, *, what: str, max_chars: int, allow_empty: bool = False) -> str:
    """Normalise user text (NFC, no control characters, trimmed) and refuse empty or oversized input.

    The length check runs before anything else so that a 10 MB message costs nothing.
    """
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise BadInputError(f"The {what} must be text, not {type(text).__name__}.")
    if len(text) > max_chars * 4 + 1024:  # far over the limit: refuse without normalising it
        raise BadInputError(f"The {what} is {len(text):,} characters long; the limit is {max_chars:,}.")
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text))
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.strip().splitlines())
    if len(text) > max_chars:
        raise BadInputError(f"The {what} is {len(text):,} characters long; the limit is {max_chars:,}.")
    if not text and not allow_empty:
        raise BadInputError(f"The {what} is empty. Please type something first.")
    return text


def _single_line(text: str) -> str:
    return " ".join(text.split())


def format_turn(turn: Turn) -> str:
    """A finished exchange as the BLIP-2 chat transcript shows it: 'Question: q Answer: a.'."""
    answer = _single_line(turn.answer)
    if answer and answer[-1] not in ".!?":
        answer += "."
    return f"Question: {_single_line(turn.question)} Answer: {answer}".rstrip()


def caption_prompt(style: PromptStyle, *, detailed: bool = False) -> PromptPlan:
    """The caption prompt of a prompt style."""
    if style is PromptStyle.INSTRUCTBLIP:
        return PromptPlan(text=INSTRUCT_DETAILED if detailed else INSTRUCT_CAPTION)
    if style is PromptStyle.BLIP2_COCO:
        return PromptPlan(text=COCO_PREFIX)
    return PromptPlan(text="")


def answer_prompt(style: PromptStyle, question: str, *, short: bool = False) -> PromptPlan:
    """The visual-question-answering prompt of a prompt style."""
    question = _single_line(question)
    if short:
        text = f"Question: {question} Short answer:"
    elif style is PromptStyle.INSTRUCTBLIP:
        text = question
    else:
        text = f"Question: {question} Answer:"
    return PromptPlan(text=text)


def chat_prompt(style: PromptStyle, history: Sequence[Turn], message: str) -> PromptPlan:
    """The chat prompt with every earlier turn kept."""
    if not history:
        return answer_prompt(style, message)
    question = _single_line(message)
    parts = [format_turn(turn) for turn in history]
    parts.append(f"Question: {question} Answer:")
    return PromptPlan(text=" ".join(parts), kept_turns=len(history))


def fit_chat(
    style: PromptStyle,
    history: Sequence[Turn],
    message: str,
    *,
    count_tokens: Callable[[str], int],
    budget: int,
) -> PromptPlan:
    """The chat prompt with the fewest oldest turns dropped so that it takes at most ``budget`` tokens.

    The newest message is never dropped; if it does not fit on its own, PromptTooLongError says so.
    ``count_tokens`` counts the language model's tokens of a prompt text, special tokens included.
    """
    alone = chat_prompt(style, (), message)
    alone_tokens = count_tokens(alone.text)
    if alone_tokens > budget:
        raise PromptTooLongError(
            f"The message is {alone_tokens:,} tokens long, but this model can take at most {max(budget, 0):,} "
            "tokens of text with the image and the answer. Please shorten it."
        )
    # Token counts shrink as more old turns go: binary-search the fewest to drop.
    low, high = 0, len(history)
    while low < high:
        drop = (low + high) // 2
        if count_tokens(chat_prompt(style, history[drop:], message).text) <= budget:
            high = drop
        else:
            low = drop + 1
    plan = chat_prompt(style, history[low:], message)
    return PromptPlan(plan.text, kept_turns=len(history) - low, dropped_turns=low)
