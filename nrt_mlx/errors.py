"""The one exception type users see: a clear, one-line message instead of a traceback."""


class NrtError(Exception):
    """A problem with the user's input (recipe, data, model, paths) that they can fix.

    The CLI prints ``str(err)`` on one line and exits with status 2; library callers can catch it.
    The message names the file, line or key and says what to do.
    """
