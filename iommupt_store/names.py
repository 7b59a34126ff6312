"""What a name may be, checked where the name is first written.

A name is stored once and then shown in every listing and carried in
handover descriptors, so it is refused at the door (``InvalidArgument``)
rather than by a crash later: printable text only (no control characters, no
line breaks, no undecodable bytes), and no longer than the column and the
descriptor that will hold it.
"""

from __future__ import annotations

from .errors import InvalidArgument

#: machine.name is VARCHAR(64)
MACHINE_NAME_CHARS = 64
#: the kernel's LUO session name is char name[64]: 63 bytes and a NUL
SESSION_NAME_BYTES = 63
#: device.owner is VARCHAR(64), and the device descriptor carries at most 64 characters
OWNER_CHARS = 64


def _check_text(what: str, value: str, size: int, limit: int, unit: str) -> str:
    rule = f"{what} {value!r} must be 1..{limit} {unit} of printable text, without spaces at either end"
    if not 1 <= size <= limit:
        raise InvalidArgument(f"{rule} (it is {size} {unit})")
    if not value.isprintable():
        raise InvalidArgument(f"{rule} (it holds a control character or a line break)")
    if value != value.strip():
        raise InvalidArgument(f"{rule} (it begins or ends with a space)")
    return value


def check_machine_name(name: str) -> str:
    return _check_text("machine name", name, len(name), MACHINE_NAME_CHARS, "characters")


def check_session_name(name: str) -> str:
    # surrogates (undecodable bytes) cannot be encoded: they are refused as unprintable below
    size = len(name.encode(errors="surrogatepass"))
    return _check_text("session name", name, size, SESSION_NAME_BYTES, "bytes")


def check_owner(owner: str) -> str:
    return _check_text("device owner", owner, len(owner), OWNER_CHARS, "characters")


def describe_owner(owner: str | None) -> str:
    """An owner for a message: quoted, or 'no owner' (never 'None')."""
    return repr(owner) if owner is not None else "no owner"
