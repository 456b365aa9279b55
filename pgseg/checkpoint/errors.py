"""The errors of checkpoint reading and writing."""
from __future__ import annotations

__all__ = ['CheckpointError', 'UnsafeCheckpointError']


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle refers to a global outside the allow-list."""


# ---------------------------------------------------------------------------------------------- restricted unpickling
