"""The error types users can meet: each message is a single line for a command to print."""

from __future__ import annotations


class CbirError(Exception):
    """A problem with the user's input or environment (missing file, wrong model, server down), not a bug."""


class ParameterError(CbirError, ValueError):
    """A bad value of one or more named parameters.

    The library words it with parameter names (``batch_size must be at least 1, got 0``); a command, whose flags
    carry the same names, words it with its flags (``--batch_size must be ...``) through :meth:`worded`. The
    message marks each name of ``parameters`` as ``{name}`` (plain replacement, not ``str.format``: the rest of
    the message may quote user text holding braces).
    """

    def __init__(self, message: str, *parameters: str):
        self.message = message
        self.parameters = parameters
        super().__init__(self.worded(lambda name: name))

    def worded(self, flag_of=lambda name: f"--{name}") -> str:
        text = self.message
        for name in self.parameters:
            text = text.replace("{" + name + "}", flag_of(name))
        return text


def check_at_least(name: str, value, least) -> None:
    """Refuse ``value`` unless it is a number of at least ``least`` (NaN included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= least:
        raise ParameterError(f"{{{name}}} must be at least {least}, got {value!r}", name)
