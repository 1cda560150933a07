"""The error type of the head-training code (bad data, arguments or checkpoints)."""


class TrainError(ValueError):
    """Bad training input or arguments (message names the problem and the fix)."""
