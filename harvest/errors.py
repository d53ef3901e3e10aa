"""The one base class of the errors a user can cause (a bad config, model, task file or run folder).

Each package raises its own subclass (ConfigError, ModelError, HookError, TaskError, StoreError,
WriterError). Messages are one line that names the file or key and the fix, so the CLI prints
them without a traceback; any other exception is a bug and keeps its traceback.
"""


class HarvestError(Exception):
    """An error the user can fix; the message is one line."""


class FieldError(HarvestError, ValueError):
    """An impossible value for one field of a library config (SamplingConfig, GenerateConfig, ...).

    `field` is the dataclass field; the CLI's config sections carry the same names, so they can say
    which YAML key is wrong without restating the rule.
    """

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")
