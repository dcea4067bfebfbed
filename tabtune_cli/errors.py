"""The one exception type a user sees as a one-line message instead of a traceback."""


class TabTuneError(Exception):
    """Bad input or configuration: the message names the file, column, key or value at fault."""
