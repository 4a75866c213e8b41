"""The exception types for problems a user can fix (bad input, missing files, bad options)."""


class TransferlabError(Exception):
    """A user-facing error. The CLI prints its message as one line, without a traceback."""


class TrainingInterrupted(TransferlabError):
    """Ctrl-C during training; the checkpoint of the last finished epoch is on disk (exit status 130)."""
