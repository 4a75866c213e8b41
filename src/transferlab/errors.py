"""The one exception type for problems a user can fix (bad input, missing files, bad options)."""


class TransferlabError(Exception):
    """A user-facing error. The CLI prints its message as one line, without a traceback."""
