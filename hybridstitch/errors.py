"""The one exception type users see."""


class HybridStitchError(ValueError):
    """A user-facing error: bad input, bad files, mismatched engines.

    Messages say what went wrong and how to fix it. Internal invariants use
    ``assert`` instead; reaching one of those is a bug in hybridstitch.
    """
