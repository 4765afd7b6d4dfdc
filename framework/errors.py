"""User-facing errors: printed as one line, exit code 2, no traceback."""


class RecipeError(ValueError):
    """A recipe or override the framework refuses, with a message that names the key and what is allowed."""

    def __init__(self, message: str, errors: list[str] | None = None):
        self.errors = errors or [message]
        super().__init__(message)


def show(key) -> str:
    """A user-given key for a one-line message: as is when plain, else quoted with escapes."""
    text = str(key)
    return text if text.isprintable() and text.strip() == text and text else repr(key)
