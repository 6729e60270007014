"""The one exception type users see: a clear, one-line message instead of a traceback."""


class NrtError(Exception):
    """A problem with the user's input (recipe, data, model, paths) that they can fix.

    The CLI prints ``str(err)`` on one line and exits with status 2; library callers can catch it.
    The message names the file, line or key and says what to do.
    """


def first_line(err: BaseException) -> str:
    """The gist of a library error on one line: its first two lines, whitespace squeezed."""
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    text = "; ".join(lines[:2]) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
