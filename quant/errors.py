"""The library's own error type: every message says what is wrong and what to do."""


class MixQuantError(Exception):
    """A user-facing error (bad file, bad input, infeasible budget, ...). Its message is meant to be shown as is."""


class InterruptedRun(MixQuantError):
    """Raised when a long run (calibration, sensitivity) is cancelled through its interrupt callback."""
