"""The one exception type for problems a user can fix (bad input, missing files)."""


class MedsegError(Exception):
    """A user-facing error: one line naming the file, what is wrong and what to do.

    The CLI prints it without a traceback and exits with code 2. Anything else that escapes is a bug.
    """


class TooLarge(MedsegError):
    """An input over a size limit (voxels, bytes unpacked or inflated): the service answers it with 413."""


def write_error(path, exc: OSError) -> MedsegError:
    """A failed write as one line: which file, why (a full disk says so), and that what was there is unchanged."""
    import errno

    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or type(exc).__name__)
    hint = "; free some space, then resume with 'medseg train --resume RUN'" if full else ""
    return MedsegError(f"{path}: could not be written ({why}); the file that was there, and every earlier file, "
                       f"is unchanged{hint}")
