"""One exception tree for the whole store.

Every error names the kernel errno it models (``errno_name``) and the process
exit code the CLI uses for it (``exit_code``): 1 for an operation that failed,
65 for bad stored or serialized data, 75 for a busy database. 70 is kept for
a bug in iommupt-store itself (an exception that is none of these).
"""

from __future__ import annotations

import errno as _errno

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATAERR = 65
EXIT_SOFTWARE = 70
EXIT_TEMPFAIL = 75

#: the kernel's names where Python's errno.errorcode picks an alias for the same number
#: (on Linux ENOTSUP == EOPNOTSUPP, EWOULDBLOCK == EAGAIN, EDEADLOCK == EDEADLK)
_KERNEL_NAMES = {
    _errno.EOPNOTSUPP: "EOPNOTSUPP",
    _errno.EAGAIN: "EAGAIN",
    _errno.EDEADLK: "EDEADLK",
}


def errno_name(number: int) -> str:
    """The kernel's name for an errno number (``EIO`` for one we do not know)."""
    return _KERNEL_NAMES.get(number) or _errno.errorcode.get(number, "EIO")


class IommuptError(Exception):
    """Root of every error raised by iommupt-store."""

    errno: int = _errno.EIO
    exit_code: int = EXIT_FAILURE

    @property
    def errno_name(self) -> str:
        return errno_name(self.errno)

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{self.errno_name}: {msg}" if msg else self.errno_name


class InvalidArgument(IommuptError):
    errno = _errno.EINVAL


class OutOfMemory(IommuptError):
    errno = _errno.ENOMEM


class AlreadyExists(IommuptError):
    errno = _errno.EEXIST


class NotFound(IommuptError):
    errno = _errno.ENOENT


class Busy(IommuptError):
    """The object is in use (EBUSY): e.g. a session that cannot finish yet."""

    errno = _errno.EBUSY


class NotPermitted(IommuptError):
    errno = _errno.EPERM


class AddressInUse(IommuptError):
    errno = _errno.EADDRINUSE


class OutOfRange(IommuptError):
    errno = _errno.ERANGE


class NoSuchAddress(IommuptError):
    """ENXIO: no page size fits the requested alignment/length."""

    errno = _errno.ENXIO


class Overflow(IommuptError):
    errno = _errno.EOVERFLOW


class NotSupported(IommuptError):
    errno = _errno.EOPNOTSUPP


class BadData(IommuptError):
    """Stored or serialized data failed validation (EBADMSG, exit 65)."""

    errno = _errno.EBADMSG
    exit_code = EXIT_DATAERR


class SchemaError(BadData):
    """The database is not an iommupt-store database, or is at the wrong revision."""

    errno = _errno.EPROTO


class StoreBusy(IommuptError):
    """The database stayed locked beyond the busy timeout (exit 75)."""

    errno = _errno.EAGAIN
    exit_code = EXIT_TEMPFAIL


class KernelGone(IommuptError):
    """The boot this object belonged to has ended (after liveupdate or reboot)."""

    errno = _errno.ESHUTDOWN


class StoreUnavailable(IommuptError):
    """The database cannot be opened or reached (missing, a directory, refused, unreadable)."""

    def __init__(self, message: str, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno
