"""User-facing errors: printed as one line, exit code 2, no traceback."""

import sys


class RecipeError(ValueError):
    """A recipe or override the framework refuses, with a message that names the key and what is allowed."""

    def __init__(self, message: str, errors: list[str] | None = None):
        # one line each, whatever a key or a library's message held (a key with a newline in it, say)
        self.errors = [line.replace("\r", "\\r").replace("\n", "\\n") for line in errors or [message]]
        super().__init__(message)


def print_errors(lines: list[str]) -> None:
    """`error: ...` lines in one write, so lines from several processes never interleave."""
    sys.stderr.write("".join(f"error: {line}\n" for line in lines))
    sys.stderr.flush()


def show(key) -> str:
    """A user-given key for a one-line message: as is when plain, else quoted with escapes."""
    text = str(key)
    return text if text.isprintable() and text.strip() == text and text else repr(key)
