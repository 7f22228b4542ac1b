"""The one exception type the CLI turns into a one-line message and exit code 2."""


class EiclError(Exception):
    """A user-facing error: bad input, missing file, refused config. One line."""
