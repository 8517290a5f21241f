"""The one exception type for problems a user can fix (bad input, missing files)."""


class MedsegError(Exception):
    """A user-facing error: one line naming the file, what is wrong and what to do.

    The CLI prints it without a traceback and exits with code 2. Anything else that escapes is a bug.
    """
