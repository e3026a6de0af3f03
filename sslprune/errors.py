"""The one exception type users see: a one-line message naming the problem and the fix."""


class UserError(Exception):
    """Bad input (flag, file, dataset, run directory). The CLI prints it on one line and exits 2."""
