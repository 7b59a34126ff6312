"""One exception tree for the whole store.

Every error names the kernel errno it models (``errno_name``) and the process
exit code the CLI uses for it (``exit_code``): 1 for an operation that failed,
65 for bad stored or serialized data, 75 for a busy database.
"""

from __future__ import annotations

import errno as _errno

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATAERR = 65
EXIT_TEMPFAIL = 75


class IommuptError(Exception):
    """Root of every error raised by iommupt-store."""

    errno: int = _errno.EIO
    exit_code: int = EXIT_FAILURE

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, "EIO")

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
