"""User-facing errors: ``launch.py`` prints their message as one line and exits non-zero."""


class KDError(Exception):
    """Base class of errors caused by the user's input or environment, not by a bug."""


class CheckpointError(KDError):
    """A checkpoint is missing, unreadable, or for another model."""


class DataError(KDError):
    """A dataset is missing or malformed."""


class ConfigError(KDError):
    """A configuration value is invalid in context (beyond what the type checks)."""


class NonFiniteLossError(KDError):
    """Training produced a NaN/Inf loss."""
