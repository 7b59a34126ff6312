"""Bad input to sessions and devices: each case is a clear error (its errno name first) and the
database is exactly as it was (logical dump of every table).

The world is ``SessionWorld`` (tests/conftest.py), in boot N (``session_world``)
or after the seal in boot N+1 (``sealed``): session ``vmm`` holds domains A
(devices 3b:00.0 and 3b:00.1, DID 1), B (device 3c:00.0, DID 2) and U; session
``other-vmm`` holds domain O, whose device 6f:00.0 is attached but not
preserved; live domain L has device 5e:00.0 (owner ``other``), not preserved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from iommupt_store.devices import attach, detach, dma_walker, parse_bdf, replace
from iommupt_store.domains import get_domain
from iommupt_store.errors import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    IommuptError,
    NotFound,
    NotPermitted,
)
from iommupt_store.liveupdate import preserve_domain, restore_domain, unpreserve_domain
from iommupt_store.liveupdate.sessions import (
    close_session,
    create_session,
    finish_session,
    preserve_device,
    preserve_domain_in_session,
    retrieve_session,
)
from iommupt_store.machine import Transaction
from tests.conftest import (
    SW_DEV_A0,
    SW_DEV_A1,
    SW_DEV_B,
    SW_DEV_L,
    SW_DEV_O,
    SW_OWNER,
    SW_SESSION,
    SW_SESSION2,
    SW_TOKEN_A,
    SW_TOKEN_B,
    SW_TOKEN_DEV,
    SW_TOKEN_O,
    SW_TOKEN_U,
    RunCli,
    SessionWorld,
    integrity,
    one_error_line,
    sqlite_dump,
)

NEW_DEV = "0000:30:00.0"
BAD_BDFS = [
    "",
    "3b",
    "0000:3b:00",
    "0000:3b:00.8",  # function 0..7
    "0000:3b:20.0",  # device 0..0x1f
    "0000:3bc:00.0",  # bus is one byte
    "10000:3b:00.0",  # segment is 16 bits
    "0000:xy:00.0",
    "0000-3b-00.0",
    "0000:3b:00.0.0",
]


def refused(
    w: SessionWorld,
    fn: Callable[[Transaction], Any],
    cls: type[IommuptError],
    errno_name: str,
    match: str | None = None,
) -> None:
    """``fn(tx)`` raises ``cls`` with ``errno_name`` first in its message, and every table is as before."""
    before = sqlite_dump(w.db)
    with pytest.raises(cls, match=match) as info:
        w.tx(fn)
    assert type(info.value) is cls
    assert info.value.errno_name == errno_name
    assert str(info.value).startswith(f"{errno_name}: ")
    assert sqlite_dump(w.db) == before
    assert integrity(w.db) == ("ok", [])


@pytest.fixture
def sealed(session_world: SessionWorld) -> SessionWorld:
    """The world after ``liveupdate``, in boot N+1 (nothing retrieved yet)."""
    session_world.seal()
    return session_world


# =========================================================================== boot N: names and tokens


def test_duplicate_session_name(session_world: SessionWorld) -> None:
    for name in (SW_SESSION, SW_SESSION2):
        refused(session_world, lambda tx: create_session(tx, name), AlreadyExists, "EEXIST", "already exists")  # noqa: B023


@pytest.mark.parametrize(
    "name", ["x" * 64, "é" * 32, "", "new\nline", "\x00"], ids=["64", "64utf8", "empty", "nl", "nul"]
)
def test_bad_session_name(session_world: SessionWorld, name: str) -> None:
    refused(session_world, lambda tx: create_session(tx, name), InvalidArgument, "EINVAL", "1..63 bytes")


def test_duplicate_domain_token(session_world: SessionWorld) -> None:
    w = session_world
    new = w.new_domain()
    for session in (SW_SESSION, SW_SESSION2):
        for token in (SW_TOKEN_A, SW_TOKEN_O, SW_TOKEN_DEV[SW_DEV_A0]):  # a domain's or a device's
            refused(
                w,
                lambda tx: preserve_domain_in_session(tx, session, new, token),  # noqa: B023
                AlreadyExists,
                "EEXIST",
                f"token {token:#x}",
            )
    # the same domain twice, in its own session or another
    for session in (SW_SESSION, SW_SESSION2):
        refused(
            w,
            lambda tx: preserve_domain_in_session(tx, session, w.a, 0x999),  # noqa: B023
            AlreadyExists,
            "EEXIST",
            "already preserved",
        )


def test_duplicate_device_token(session_world: SessionWorld) -> None:
    w = session_world
    # device O's domain is preserved in its session: only the token is wrong
    for token in (SW_TOKEN_DEV[SW_DEV_A0], SW_TOKEN_O, SW_TOKEN_U):
        refused(
            w,
            lambda tx: preserve_device(tx, SW_SESSION2, SW_DEV_O, token),  # noqa: B023
            AlreadyExists,
            "EEXIST",
            f"token {token:#x}",
        )
    # the same device twice
    refused(w, lambda tx: preserve_device(tx, SW_SESSION, SW_DEV_A0, 0x999), AlreadyExists, "EEXIST", "already")
    w.tx(lambda tx: preserve_device(tx, SW_SESSION2, SW_DEV_O, 0x999))  # the right token works


def test_unknown_session(session_world: SessionWorld) -> None:
    w = session_world
    new = w.new_domain()
    refused(w, lambda tx: preserve_domain_in_session(tx, "nope", new, 0x999), NotFound, "ENOENT", "no session")
    refused(w, lambda tx: preserve_device(tx, "nope", SW_DEV_O, 0x999), NotFound, "ENOENT", "no session")
    refused(w, lambda tx: close_session(tx, "nope"), NotFound, "ENOENT", "no session")
    # an incoming session of boot N+1 does not exist in boot N
    refused(w, lambda tx: retrieve_session(tx, SW_SESSION), NotFound, "ENOENT")
    refused(w, lambda tx: finish_session(tx, SW_SESSION), NotFound, "ENOENT")


# =========================================================================== boot N: preserving devices


def test_preserve_device_whose_domain_is_not_preserved(session_world: SessionWorld) -> None:
    refused(
        session_world,
        lambda tx: preserve_device(tx, SW_SESSION, SW_DEV_L, 0x999),
        InvalidArgument,
        "EINVAL",
        "is not preserved in session",
    )


def test_preserve_device_whose_domain_is_in_another_session(session_world: SessionWorld) -> None:
    refused(
        session_world,
        lambda tx: preserve_device(tx, SW_SESSION, SW_DEV_O, 0x999),
        InvalidArgument,
        "EINVAL",
        "is not preserved in session 'vmm'",
    )


def test_preserve_detached_or_unknown_device(session_world: SessionWorld) -> None:
    w = session_world
    w.tx(lambda tx: detach(tx, SW_DEV_L, owner="other"))
    refused(w, lambda tx: preserve_device(tx, SW_SESSION, SW_DEV_L, 0x999), InvalidArgument, "EINVAL", "not attached")
    refused(w, lambda tx: preserve_device(tx, SW_SESSION, "0000:77:00.0", 0x999), NotFound, "ENOENT", "no device")


def test_preserved_device_cannot_be_attached_or_detached(session_world: SessionWorld) -> None:
    w = session_world
    for bdf in (SW_DEV_A0, SW_DEV_A1, SW_DEV_B):
        refused(w, lambda tx: attach(tx, bdf, w.l, owner=SW_OWNER), Busy, "EBUSY", "preserved")  # noqa: B023
        refused(w, lambda tx: detach(tx, bdf, owner=SW_OWNER), Busy, "EBUSY", "preserved")  # noqa: B023
    # nor its domain unpreserved behind the session's back, nor freed
    refused(w, lambda tx: unpreserve_domain(tx, SW_TOKEN_A), Busy, "EBUSY", "close its session")
    refused(w, lambda tx: get_domain(tx, w.a).free(), NotPermitted, "EPERM", "preserved")
    # and nothing new attaches to a preserved domain
    refused(w, lambda tx: attach(tx, NEW_DEV, w.a, owner=SW_OWNER), NotPermitted, "EPERM", "preserved")


def test_attach_by_another_owner(session_world: SessionWorld) -> None:
    w = session_world
    for owner in ("intruder", None):
        refused(w, lambda tx: attach(tx, SW_DEV_L, w.o, owner=owner), NotPermitted, "EPERM", "owned by")  # noqa: B023
        refused(w, lambda tx: detach(tx, SW_DEV_L, owner=owner), NotPermitted, "EPERM", "owned by")  # noqa: B023


def test_attach_with_a_bad_did(session_world: SessionWorld) -> None:
    w = session_world
    new = w.new_domain()
    for did in (0, -1, 65536):
        refused(w, lambda tx: attach(tx, NEW_DEV, new, did=did), InvalidArgument, "EINVAL", "outside")  # noqa: B023
    # DID 1 is domain A's (in this boot: in use, not reserved)
    refused(w, lambda tx: attach(tx, NEW_DEV, new, did=1), Busy, "EBUSY", "in use by domain")
    # domain L already has a DID: another one is refused
    refused(w, lambda tx: attach(tx, NEW_DEV, w.l, did=77), InvalidArgument, "EINVAL", "already has domain id")


@pytest.mark.parametrize("bdf", BAD_BDFS)
def test_bad_bdf(session_world: SessionWorld, bdf: str) -> None:
    w = session_world
    with pytest.raises(InvalidArgument, match="is not a PCI address") as info:
        parse_bdf(bdf)
    assert info.value.errno_name == "EINVAL"
    for fn in (
        lambda tx: attach(tx, bdf, w.l, owner="other"),
        lambda tx: detach(tx, bdf, owner="other"),
        lambda tx: preserve_device(tx, SW_SESSION, bdf, 0x999),
        lambda tx: replace(tx, bdf, w.l, owner="other"),
        lambda tx: dma_walker(tx, bdf),
    ):
        refused(w, fn, InvalidArgument, "EINVAL", "is not a PCI address")


def test_short_bdf_forms_are_normalised() -> None:
    assert parse_bdf("3b:0.1") == "0000:3b:00.1"
    assert parse_bdf(" 1:3B:1f.7 ") == "0001:3b:1f.7"
    assert parse_bdf("FFFF:ff:1F.0") == "ffff:ff:1f.0"


def test_sealed_session_is_frozen(session_world: SessionWorld) -> None:
    """In boot N+1 the sealed outgoing sessions of boot N are out of reach of boot-N operations."""
    w = session_world
    w.seal()
    new = w.new_domain()
    refused(w, lambda tx: preserve_domain_in_session(tx, SW_SESSION, new, 0x999), NotFound, "ENOENT")
    refused(w, lambda tx: close_session(tx, SW_SESSION), NotFound, "ENOENT")


# =========================================================================== boot N+1


def test_retrieve_twice_and_unknown(sealed: SessionWorld) -> None:
    w = sealed
    refused(w, lambda tx: retrieve_session(tx, "nope"), NotFound, "ENOENT", "no session 'nope'")
    w.retrieve()
    refused(w, lambda tx: retrieve_session(tx, SW_SESSION), InvalidArgument, "EINVAL", "already been retrieved")


def test_finish_out_of_order(sealed: SessionWorld) -> None:
    w = sealed
    refused(w, lambda tx: finish_session(tx, "nope"), NotFound, "ENOENT")
    refused(w, lambda tx: finish_session(tx, SW_SESSION), InvalidArgument, "EINVAL", "not been retrieved")
    w.retrieve()
    # no domain restored: three devices still DMA through the preserved tables
    refused(w, lambda tx: finish_session(tx, SW_SESSION), Busy, "EBUSY", "0000:3b:00.0, 0000:3b:00.1, 0000:3c:00.0")
    w.restore(SW_TOKEN_B)
    refused(w, lambda tx: finish_session(tx, SW_SESSION), Busy, "EBUSY", "0000:3b:00.0, 0000:3b:00.1 still DMA")
    w.restore(SW_TOKEN_A)
    w.tx(lambda tx: finish_session(tx, SW_SESSION))
    refused(w, lambda tx: finish_session(tx, SW_SESSION), InvalidArgument, "EINVAL", "already finished")
    refused(w, lambda tx: retrieve_session(tx, SW_SESSION), InvalidArgument, "EINVAL")


def test_restore_out_of_order(sealed: SessionWorld) -> None:
    w = sealed
    refused(w, lambda tx: restore_domain(tx, SW_TOKEN_A), NotPermitted, "EPERM", "retrieve it before")
    refused(w, lambda tx: restore_domain(tx, 0x999), NotFound, "ENOENT")
    # a device's token names no domain
    refused(w, lambda tx: restore_domain(tx, SW_TOKEN_DEV[SW_DEV_A0]), InvalidArgument, "EINVAL", "device")
    w.retrieve()
    restored = w.restore(SW_TOKEN_A)
    refused(w, lambda tx: restore_domain(tx, SW_TOKEN_A), AlreadyExists, "EEXIST", f"domain {restored}")
    # a restored domain is not preserved again, and is not freed under its devices
    refused(w, lambda tx: preserve_domain(tx, restored, 0x999), NotPermitted, "EPERM", "cannot be preserved again")
    refused(w, lambda tx: get_domain(tx, restored).free(), Busy, "EBUSY", "attached to device")


def test_reserved_dids(sealed: SessionWorld) -> None:
    w = sealed
    new = w.new_domain()
    for did in (1, 2):
        refused(w, lambda tx: attach(tx, NEW_DEV, new, did=did), Busy, "EBUSY", "reserved")  # noqa: B023
    w.tx(lambda tx: attach(tx, NEW_DEV, new))
    assert w.did(NEW_DEV) not in (1, 2)


def test_preserved_device_before_restore(sealed: SessionWorld) -> None:
    w = sealed
    new = w.new_domain()
    for bdf in (SW_DEV_A0, SW_DEV_B):
        refused(w, lambda tx: attach(tx, bdf, new, owner=SW_OWNER), Busy, "EBUSY", "still DMAs")  # noqa: B023
        refused(w, lambda tx: detach(tx, bdf, owner=SW_OWNER), Busy, "EBUSY", "still DMAs")  # noqa: B023
        refused(w, lambda tx: replace(tx, bdf, new, owner=SW_OWNER), InvalidArgument, "EINVAL", "replace moves")  # noqa: B023


def test_replace_by_another_owner(sealed: SessionWorld) -> None:
    w = sealed
    w.retrieve()
    restored = w.restore(SW_TOKEN_B)
    new = w.new_domain("vtdss")
    for owner in ("intruder", None):
        refused(w, lambda tx: replace(tx, SW_DEV_B, new, owner=owner), NotPermitted, "EPERM", "may not replace")  # noqa: B023
        # nor may it take the device with a plain attach (the ownership hijack), nor detach it
        refused(w, lambda tx: attach(tx, SW_DEV_B, new, owner=owner), NotPermitted, "EPERM", "owned by")  # noqa: B023
        refused(w, lambda tx: detach(tx, SW_DEV_B, owner=owner), NotPermitted, "EPERM", "owned by")  # noqa: B023
    # replace onto something that is not a live domain of this boot
    refused(w, lambda tx: replace(tx, SW_DEV_B, restored, owner=SW_OWNER), NotPermitted, "EPERM", "restored")
    refused(w, lambda tx: replace(tx, SW_DEV_B, 9999, owner=SW_OWNER), NotFound, "ENOENT")
    # a device that is not attached, or not on a restored domain
    refused(w, lambda tx: replace(tx, SW_DEV_L, new, owner="other"), InvalidArgument, "EINVAL", "not attached")
    assert w.tx(lambda tx: replace(tx, SW_DEV_B, new, owner=SW_OWNER)) == restored
    refused(w, lambda tx: replace(tx, SW_DEV_B, new, owner=SW_OWNER), InvalidArgument, "EINVAL", "replace moves")


def test_discarded_session_cannot_be_retrieved(sealed: SessionWorld) -> None:
    w = sealed
    w.seal()  # boot 3: boot 1's sessions are gone
    refused(w, lambda tx: retrieve_session(tx, SW_SESSION), NotFound, "ENOENT")
    refused(w, lambda tx: finish_session(tx, SW_SESSION), NotFound, "ENOENT")
    refused(w, lambda tx: restore_domain(tx, SW_TOKEN_A), NotFound, "ENOENT")


# =========================================================================== the command line


def _cli_refused(w: SessionWorld, run_cli: RunCli, args: list[str], errno_name: str, match: str) -> None:
    before = sqlite_dump(w.db)
    proc = run_cli("--machine", "lu", *args, db=w.db)
    assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
    assert proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: {errno_name}: "), line
    assert match in line, line
    assert sqlite_dump(w.db) == before


def test_cli_refusals(session_world: SessionWorld, run_cli: RunCli) -> None:
    w = session_world
    # boot N
    _cli_refused(w, run_cli, ["session", "create", SW_SESSION, "--json"], "EEXIST", "already exists")
    _cli_refused(w, run_cli, ["session", "create", "x" * 64], "EINVAL", "1..63 bytes")
    _cli_refused(
        w,
        run_cli,
        ["device", "preserve", SW_DEV_O, "--session", SW_SESSION, "--token", "0x99"],
        "EINVAL",
        "not preserved in session 'vmm'",
    )
    _cli_refused(w, run_cli, ["device", "attach", "0000:3b:00.8", str(w.l)], "EINVAL", "not a PCI address")
    _cli_refused(w, run_cli, ["device", "detach", SW_DEV_A0, "--owner", SW_OWNER], "EBUSY", "preserved")
    _cli_refused(w, run_cli, ["unpreserve", "--token", hex(SW_TOKEN_A)], "EBUSY", "close its session")
    # boot N+1
    w.seal()
    new = w.new_domain("vtdss")
    _cli_refused(w, run_cli, ["device", "attach", NEW_DEV, str(new), "--did", "2", "--json"], "EBUSY", "reserved")
    _cli_refused(w, run_cli, ["device", "translate", SW_DEV_L, "0x1000"], "ENOENT", "DMA is blocked")
    w.retrieve()
    _cli_refused(w, run_cli, ["session", "retrieve", SW_SESSION], "EINVAL", "already been retrieved")
    _cli_refused(w, run_cli, ["session", "finish", SW_SESSION, "--json"], "EBUSY", "cannot finish")
    w.restore(SW_TOKEN_B)
    _cli_refused(w, run_cli, ["device", "replace", SW_DEV_B, str(new), "--owner", "intruder"], "EPERM", "intruder")


def test_attach_cannot_move_a_device_off_its_restored_domain(session_world: SessionWorld) -> None:
    """Moving off a restored domain is the replace flow (which frees it); a plain attach is refused."""
    w = session_world
    w.seal()
    w.retrieve(SW_SESSION)
    w.restore(SW_TOKEN_B)
    target = w.new_domain()
    before = sqlite_dump(w.db)
    with pytest.raises(Busy, match="use 'device replace'"):
        w.tx(lambda tx: attach(tx, SW_DEV_B, target, owner=SW_OWNER))
    assert sqlite_dump(w.db) == before
