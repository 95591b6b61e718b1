"""Errors a user can act on: each message says what went wrong and what to do."""


class Sam2UnetError(Exception):
    """Base class: the message is shown to the user as is (one line, no traceback)."""


class InputError(Sam2UnetError):
    """The image, label map or output path cannot be used."""


class PromptError(Sam2UnetError):
    """A point or box does not fit the volume."""


class ModelError(Sam2UnetError):
    """A model file or model card is missing, corrupt or does not fit the contract."""


class BackendError(Sam2UnetError):
    """An inference backend is missing or failed."""


class Cancelled(Sam2UnetError):
    """The user cancelled a run; nothing was written."""
