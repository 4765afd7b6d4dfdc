"""User-facing errors: printed as one line, exit code 2, no traceback."""


class RecipeError(ValueError):
    """A recipe or override the framework refuses, with a message that names the key and what is allowed."""

    def __init__(self, message: str, errors: list[str] | None = None):
        self.errors = errors or [message]
        super().__init__(message)
