"""Errors a user can cause. The CLI prints them as one line and exits non-zero; no traceback."""


class UserError(Exception):
    """A mistake the user can fix: bad flag value, lab name taken, missing kernel feature...

    The message is one line that says what is wrong and what to do.
    """

    exit_code = 1
