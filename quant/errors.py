"""The library's own error type: every message says what is wrong and what to do."""


class MixQuantError(Exception):
    """A user-facing error (bad file, bad input, infeasible budget, ...). Its message is meant to be shown as is."""


def reason(e: BaseException, limit: int = 200) -> str:
    """What a one-line message quotes of an exception: its message's first line (its type's name when it has none),
    at most `limit` characters."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


class InterruptedRun(MixQuantError):
    """Raised when a long run (calibration, sensitivity) is cancelled through its interrupt callback."""
