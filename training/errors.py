"""The exception types that mean "the user asked for something impossible"."""


class UserError(Exception):
    """A mistake in input (config, paths, data) reported as one line, never as a traceback."""


class CollectiveError(UserError):
    """A UserError that every rank raises together, from a collective's result: on each node only
    local rank 0 prints it, so ``--nproc N`` shows the line once instead of N times."""
