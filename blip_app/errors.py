"""Errors a user may see.

Each one carries a full sentence that names the bad value and, where there is one, the fix.
Everything else that goes wrong is a bug: it is logged with its traceback and the user gets a
generic message (see :func:`user_message`).
"""

from __future__ import annotations


class BlipAppError(Exception):
    """An error whose message is written for the person using the app."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else self.__class__.__name__


class UnknownModelError(BlipAppError, KeyError):
    """A model name that is neither in the catalog, nor offered, nor a checkpoint folder."""


class UnsupportedCheckpointError(BlipAppError):
    """A checkpoint that is not BLIP-2 / InstructBLIP, or one that cannot be made to use the image."""


class ModelLoadError(BlipAppError):
    """Loading failed: no network, gated repository, not enough memory or disk, corrupt files."""


class BadImageError(BlipAppError, ValueError):
    """An image that cannot be read, is not an allowed format, or is too large."""


class BadInputError(BlipAppError, ValueError):
    """Text input that is refused: empty, too long, or otherwise unusable."""


class PromptTooLongError(BadInputError):
    """A single message that does not fit the model's context on its own."""


class SettingsError(BlipAppError, ValueError):
    """A generation setting out of its allowed range."""


class BusyError(BlipAppError):
    """The server is at capacity; the request was not started."""


class RateLimitedError(BusyError):
    """This client sent more requests than its allowance."""


class GenerationError(BlipAppError):
    """Generation failed at run time (out of memory, time limit, a failure in the model)."""


class CancelledError(BlipAppError):
    """The request was cancelled by the user before it finished."""


GENERIC_MESSAGE = "Something went wrong on the server while handling this request. It has been logged; please try again."


def user_message(exc: BaseException) -> str:
    """The text to show a user for ``exc``: its own sentence for our errors, a generic one otherwise."""
    if isinstance(exc, BlipAppError):
        return str(exc)
    return GENERIC_MESSAGE
