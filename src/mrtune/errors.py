"""The one exception type users see: a single line naming the problem and what to do about it."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty: what a one-line
    error quotes of a library's (often many-line) failure."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class MrtuneError(Exception):
    """A user-facing failure. The CLI prints `error: <message>` and exits with status 2 (no traceback)."""


class TrainingInterrupted(MrtuneError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; the CLI exits with 128 + the signal number."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
