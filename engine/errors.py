"""The one exception type a user can cause.

Anything raised as `WorkbenchError` is printed by the CLI as a single line
(`error: ...`) with a non-zero exit; anything else is a bug and keeps its traceback.
"""


class WorkbenchError(Exception):
    """A failure the user caused (bad path, bad config, bad checkpoint...), explained in one line."""


class ConfigError(WorkbenchError):
    """The configuration is malformed, names an unknown key, or describes an impossible model."""


class DataError(WorkbenchError):
    """Input data is missing, empty, unreadable or malformed beyond what can be skipped."""


class CheckpointError(WorkbenchError):
    """A checkpoint is missing, truncated, or does not match the model or tokenizer."""
