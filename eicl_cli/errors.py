"""The one exception type the CLI turns into a one-line message and exit code 2."""


class EiclError(Exception):
    """A user-facing error: bad input, missing file, refused config. One line."""


def first_line(e: BaseException) -> str:
    """The first line of another library's exception message (its type's name
    when the message is empty), to quote inside a one-line EiclError."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
