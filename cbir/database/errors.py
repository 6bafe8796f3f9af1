"""The one error type of the database layer."""

from cbir.errors import CbirError


class DatabaseError(CbirError):
    """An error a user can meet (unknown database, server down, wrong extractor...).

    ``str(error)`` is always one line that says what went wrong and, where there is one, what to do. It is a
    ``CbirError``, so every command prints it as its one-line error and exits non-zero.
    """

    def __init__(self, message: str, *parameters: str):
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        super().__init__("; ".join(lines), *parameters)
