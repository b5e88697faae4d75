"""The one exception type users see: a single line naming the problem and what to do about it."""


class MrtuneError(Exception):
    """A user-facing failure. The CLI prints `error: <message>` and exits with status 2 (no traceback)."""
