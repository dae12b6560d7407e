"""Golden tables of the prompt formats per family, and the chat budget."""

from __future__ import annotations

import pytest

from blip_app.core import prompts
from blip_app.core.catalog import PromptStyle
from blip_app.core.prompts import Turn
from blip_app.errors import BadInputError, PromptTooLongError

B, COCO, INSTR = PromptStyle.BLIP2, PromptStyle.BLIP2_COCO, PromptStyle.INSTRUCTBLIP


# InstructBLIP's Q-Former reads the same text (the engine passes PromptPlan.text to both).
@pytest.mark.parametrize(
    ("style", "detailed", "text"),
    [
        (B, False, ""),
        (B, True, ""),
        (COCO, False, "a photo of"),
        (INSTR, False, "A short image caption."),  # LAVIS's caption prompt
        (INSTR, True, "Write a detailed description of the image."),
    ],
)
def test_caption_prompts(style, detailed, text):
    assert prompts.caption_prompt(style, detailed=detailed).text == text


@pytest.mark.parametrize(
    ("style", "short", "text"),
    [
        (B, False, "Question: what is this? Answer:"),
        (B, True, "Question: what is this? Short answer:"),
        (COCO, False, "Question: what is this? Answer:"),
        (INSTR, False, "what is this?"),
        (INSTR, True, "Question: what is this? Short answer:"),
    ],
)
def test_answer_prompts(style, short, text):
    assert prompts.answer_prompt(style, "what is this?", short=short).text == text


HISTORY = (Turn("what is it?", "a cat"), Turn("what colour?", "black and white."))


@pytest.mark.parametrize(
    ("style", "history", "text"),
    [
        (B, (), "Question: where is it? Answer:"),
        (B, HISTORY,
         "Question: what is it? Answer: a cat. Question: what colour? Answer: black and white. "
         "Question: where is it? Answer:"),
        (INSTR, (), "where is it?"),
        (INSTR, HISTORY,
         "Question: what is it? Answer: a cat. Question: what colour? Answer: black and white. "
         "Question: where is it? Answer:"),
    ],
)
def test_chat_prompts(style, history, text):
    plan = prompts.chat_prompt(style, history, "where is it?")
    assert (plan.text, plan.kept_turns) == (text, len(history))


def test_turns_are_single_line_and_punctuated_once():
    assert prompts.format_turn(Turn("a\nb ?", "yes!")) == "Question: a b ? Answer: yes!"
    assert prompts.format_turn(Turn("q", "")) == "Question: q Answer:"


def words(text: str) -> int:
    return len(text.split())


def test_fit_chat_drops_oldest_turns_first_and_reports_them():
    history = [Turn(f"question {i}", f"answer {i}") for i in range(10)]
    full = words(prompts.chat_prompt(B, history, "newest?").text)
    plan = prompts.fit_chat(B, history, "newest?", count_tokens=words, budget=full - 1)
    assert plan.dropped_turns == 1 and plan.kept_turns == 9
    assert "question 0" not in plan.text and "question 1 " in plan.text and plan.text.endswith("newest? Answer:")
    tight = prompts.fit_chat(B, history, "newest?", count_tokens=words, budget=4)
    assert tight.dropped_turns == 10 and tight.text == "Question: newest? Answer:"


def test_fit_chat_refuses_a_message_too_long_on_its_own():
    with pytest.raises(PromptTooLongError, match="at most 3 tokens"):
        prompts.fit_chat(B, [], "a b c d e", count_tokens=words, budget=3)


def test_instructblip_trimmed_chat_keeps_the_newest_question():
    history = [Turn(f"question {i}", f"answer {i}") for i in range(10)]
    plan = prompts.fit_chat(INSTR, history, "newest?", count_tokens=words, budget=12)
    assert plan.dropped_turns > 0 and "question 0" not in plan.text and plan.text.endswith("newest? Answer:")


def test_fit_chat_keeps_everything_that_fits():
    plan = prompts.fit_chat(INSTR, list(HISTORY), "and?", count_tokens=words, budget=1000)
    assert plan.dropped_turns == 0 and plan.kept_turns == 2


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("  hello\x00 world  ", "hello world"), ("e\u0301", "\u00e9"), ("a\n\n b", "a\n\nb"), ("<b>x</b>", "<b>x</b>")],
)
def test_clean_text(raw, clean):
    assert prompts.clean_text(raw, what="question", max_chars=100) == clean


def test_clean_text_refuses_empty_and_huge():
    with pytest.raises(BadInputError, match="question is empty"):
        prompts.clean_text(" \x00 \n", what="question", max_chars=100)
    with pytest.raises(BadInputError, match="10,000,000 characters"):
        prompts.clean_text("x" * 10_000_000, what="message", max_chars=2000)
