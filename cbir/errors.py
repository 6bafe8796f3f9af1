"""The error types users can meet: each message is a single line for a command to print."""

from __future__ import annotations


class CbirError(Exception):
    """A problem with the user's input or environment (missing file, wrong model, server down), not a bug.

    A message may name parameters, marked ``{name}`` and listed in ``parameters``: the library words them as
    parameter names (``batch_size must be at least 1``); a command, whose flags carry the same names, words them as
    its flags through :meth:`worded` (``--batch_size must be ...``). The marks are replaced, not ``str.format``ted:
    the rest of the message may quote user text holding braces.
    """

    def __init__(self, message: str = "", *parameters: str):
        self.message = str(message)
        self.parameters = parameters
        super().__init__(self.worded(lambda name: name))

    def worded(self, flag_of=lambda name: f"--{name}") -> str:
        text = self.message
        for name in self.parameters:
            text = text.replace("{" + name + "}", flag_of(name))
        return text


class ParameterError(CbirError, ValueError):
    """A bad value of one or more named parameters (a ``ValueError`` to library callers)."""


def check_at_least(name: str, value, least) -> None:
    """Refuse ``value`` unless it is a number of at least ``least`` (NaN included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= least:
        raise ParameterError(f"{{{name}}} must be at least {least}, got {value!r}", name)
