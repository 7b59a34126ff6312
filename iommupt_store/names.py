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


def _check_text(what: str, value: str) -> None:
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if not value.isprintable():
        raise InvalidArgument(f"{what} {value!r} must be printable text (no control characters or line breaks)")
    if value != value.strip():
        raise InvalidArgument(f"{what} {value!r} must not begin or end with spaces")


def check_machine_name(name: str) -> str:
    _check_text("machine name", name)
    if len(name) > MACHINE_NAME_CHARS:
        raise InvalidArgument(f"machine name {name!r} is {len(name)} characters long; at most {MACHINE_NAME_CHARS}")
    return name


def check_session_name(name: str) -> str:
    _check_text("session name", name)
    size = len(name.encode())
    if size > SESSION_NAME_BYTES:
        raise InvalidArgument(f"session name {name!r} is {size} bytes in UTF-8; at most {SESSION_NAME_BYTES}")
    return name


def check_owner(owner: str) -> str:
    _check_text("device owner", owner)
    if len(owner) > OWNER_CHARS:
        raise InvalidArgument(f"device owner {owner!r} is {len(owner)} characters long; at most {OWNER_CHARS}")
    return owner


def describe_owner(owner: str | None) -> str:
    """An owner for a message: quoted, or 'no owner' (never 'None')."""
    return repr(owner) if owner is not None else "no owner"
