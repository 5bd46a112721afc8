"""The one exception type that means "the user asked for something impossible"."""


class UserError(Exception):
    """A mistake in input (config, paths, data) reported as one line, never as a traceback."""
