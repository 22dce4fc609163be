"""The one exception type for mistakes a user can fix.

Anything raised as `TrustgenError` is shown by the CLI as a single sentence with a non-zero exit
code; every other exception is a bug in trustgen and keeps its traceback.
"""


class TrustgenError(Exception):
    """A user-facing error: bad input, a missing file, an invalid setting."""
