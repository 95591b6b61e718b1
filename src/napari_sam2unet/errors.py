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
    """The user stopped a run: Ctrl-C or a Cancel button (exit 130), or SIGTERM (exit 143)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` (temporary files) runs."""


# The torch the [export] and [train] extras pin (pyproject.toml; tests/test_export.py checks both).
TORCH = "torch==2.13.0"


def require_torch(purpose: str, extra: str = "export"):
    """The torch module, or a ModelError that says in one line which extra to install.

    `purpose` starts the message ("exporting", "fine-tuning"); `extra` is the pyproject extra
    that brings torch (export and train bring the same packages). torch is imported here, on
    first use, so that the inference library and the CLI start without it.
    """
    try:
        import torch
    except ImportError:
        raise ModelError(
            f'{purpose} needs PyTorch: pip install "napari-sam2unet[{extra}]" ({TORCH}, CPU wheels are enough)'
        ) from None
    return torch
