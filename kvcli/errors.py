"""User-facing errors: the CLI prints each as one line and exits non-zero."""


class KvcliError(Exception):
    """A problem the user can fix; `str(err)` says what went wrong and what to do."""

    exit_code = 2


class InputError(KvcliError):
    """A document, path or option the user gave cannot be used."""


class OutputError(InputError):
    """A file kvcli was asked to write, or keeps under KVCLI_HOME, cannot be written there."""


class ModelError(KvcliError):
    """The model cannot be found, verified or loaded."""


class BudgetError(KvcliError):
    """The compression budget or method parameters are invalid."""


def shorten(text: str, limit: int = 80) -> str:
    """`text` for a one-line message, cut in the middle when long (a pasted paragraph, not a path)."""
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-(limit // 2):]}"
