"""The one exception type for mistakes a user can fix.

Anything raised as `TrustgenError` is shown by the CLI as a single sentence with a non-zero exit
code; every other exception is a bug in trustgen and keeps its traceback.
"""


class TrustgenError(Exception):
    """A user-facing error: bad input, a missing file, an invalid setting."""


class TrainingInterrupted(TrustgenError):
    """Training stopped by a signal after checkpointing; the CLI exits with `exit_code` (128 +
    the signal's number, as a shell reports a process the signal ended)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
