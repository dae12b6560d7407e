"""Generation presets, layering and validation."""

from __future__ import annotations

import pytest

from blip_app.core.settings import Limits, Preset, Task, resolve_settings
from blip_app.errors import SettingsError


def test_presets_per_task():
    standard = resolve_settings(Task.CAPTION, Preset.STANDARD)
    assert (standard.num_beams, standard.max_new_tokens, standard.streams) == (5, 30, False)
    answer = resolve_settings(Task.ANSWER, Preset.STANDARD)  # BLIP-2 OPT unless traits say otherwise
    assert (answer.max_new_tokens, answer.length_penalty) == (10, 0.0)
    fast = resolve_settings(Task.CHAT, Preset.FAST)
    assert fast.num_beams == 1 and fast.streams and not fast.do_sample
    detailed = resolve_settings(Task.CAPTION, Preset.DETAILED)
    assert detailed.max_new_tokens == 256 and detailed.repetition_penalty == 1.5


def test_checkpoint_settings_apply_to_standard_only_and_overrides_win():
    saved = {"num_beams": 3, "max_new_tokens": 40, "bos_token_id": 2}
    assert resolve_settings("caption", "standard", checkpoint=saved).num_beams == 3
    assert resolve_settings("caption", "fast", checkpoint=saved).num_beams == 1
    assert resolve_settings("caption", "standard", {"num_beams": 2}, checkpoint=saved).num_beams == 2


def test_overrides_are_coerced_and_none_means_unset():
    settings = resolve_settings("chat", "fast", {"max_new_tokens": "12", "temperature": None, "do_sample": "true"})
    assert settings.max_new_tokens == 12 and settings.do_sample is True and settings.temperature == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"max_new_tokens": 100_000}, "allows at most 512"),
        ({"num_beams": 9}, "allows at most 8"),
        ({"temperature": 0}, "temperature must be above 0"),
        ({"top_p": 1.5}, "top_p must be above 0 and at most 1"),
        ({"repetition_penalty": "abc"}, "must be a number"),
        ({"length_penalty": float("inf")}, "finite"),
        ({"max_new_tokens": 2.5}, "whole number"),
        ({"min_new_tokens": 50, "max_new_tokens": 10}, "larger than max_new_tokens"),
        ({"do_sample": "maybe"}, "true or false"),
        ({"beams": 2}, "Unknown generation setting 'beams'"),
    ],
)
def test_out_of_range_values_are_named(overrides, message):
    with pytest.raises(SettingsError, match=message):
        resolve_settings("chat", "standard", overrides)


def test_unknown_task_and_preset():
    with pytest.raises(SettingsError, match="Unknown preset 'turbo'"):
        resolve_settings("chat", "turbo")
    with pytest.raises(SettingsError, match="Unknown task"):
        resolve_settings("poem")


def test_server_caps_are_configurable():
    with pytest.raises(SettingsError, match="at most 64"):
        resolve_settings("chat", "standard", {"max_new_tokens": 65}, limits=Limits(max_new_tokens=64))


def test_numbers_in_messages_have_thousands_separators():
    with pytest.raises(SettingsError, match=r"^max_new_tokens is 100,000; this server allows at most 2,048\.$"):
        resolve_settings("chat", "standard", {"max_new_tokens": 100_000}, limits=Limits(max_new_tokens=2048))
