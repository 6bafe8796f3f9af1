"""The one error type users can meet: its message is a single line for the command line to print."""


class CbirError(Exception):
    """A problem with the user's input or environment (missing file, wrong model, server down), not a bug."""
