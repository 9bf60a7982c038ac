"""Exceptions with messages meant for people.

Every error a user can cause (bad model name, bad config, missing data, corrupt
checkpoint, diverging run) is raised as a subclass of :class:`PnnhError`. The CLI
prints its message on one line and exits non-zero, without a traceback.
"""


class PnnhError(Exception):
    """Base class of all user-facing pnnh errors."""

    exit_code = 2


class ConfigError(PnnhError, ValueError):
    """A configuration value, file or model kwarg is invalid."""


class ModelNotFoundError(PnnhError, KeyError):
    """An unknown model name was requested from the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class DataError(PnnhError):
    """A dataset is missing, truncated or malformed."""


class CheckpointError(PnnhError):
    """A checkpoint is missing, corrupt, unsafe or belongs to another model."""


class DivergenceError(PnnhError):
    """The training loss became NaN or infinite."""

    exit_code = 3


class PeerError(PnnhError):
    """Another process of a distributed run stopped with an error; that process prints it."""

    quiet = True  # the CLI prints nothing for it: the failing process already said what is wrong
