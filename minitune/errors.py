"""One exception type for bad input, so recipes can print a single clear line instead of a traceback."""


class MinituneError(Exception):
    """Bad input or an unsupported setting. The message names the field and, where there is one, the fix."""
