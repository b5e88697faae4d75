"""The one exception type users see: a single line naming the problem and what to do about it."""


class MrtuneError(Exception):
    """A user-facing failure. The CLI prints `error: <message>` and exits with status 2 (no traceback)."""


class TrainingInterrupted(MrtuneError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; the CLI exits with 128 + the signal number."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
