"""User-facing errors: printed as one line, exit code 2, no traceback."""

import sys


class RecipeError(ValueError):
    """A recipe or override the framework refuses, with a message that names the key and what is allowed."""

    def __init__(self, message: str, errors: list[str] | None = None):
        # one line each, whatever a key or a library's message held (a key with a newline in it, say)
        self.errors = [one_line(line) for line in errors or [message]]
        super().__init__(message)


def one_line(text: str) -> str:
    """Every character that ends a line for Python (\\n, \\r, \\v, \\f, \\x1c-\\x1e, \\x85, \\u2028, \\u2029)
    written as its escape (the fuzz found model.kwargs keys holding them; str.splitlines() splits on each)."""
    return "".join(c if len(f"a{c}b".splitlines()) == 1 else c.encode("unicode_escape").decode() for c in text)


def print_errors(lines: list[str]) -> None:
    """`error: ...` lines in one write, so lines from several processes never interleave."""
    sys.stderr.write("".join(f"error: {one_line(line)}\n" for line in lines))
    sys.stderr.flush()


def show(key) -> str:
    """A user-given key for a one-line message: as is when plain, else quoted with escapes."""
    text = str(key)
    return text if text.isprintable() and text.strip() == text and text else repr(key)
