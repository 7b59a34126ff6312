"""Tampering with a stored live update: restore refuses, fsck reports, no reader crashes.

One world is built by real processes: boot 1 (a child) preserves three domains
and a device and seals; boot 2 (another child) retrieves the session and
restores one domain. Each case then edits that database by hand with plain
``sqlite3`` (CHECK constraints switched off, as a tamperer can) and asserts:
``restore`` of the affected token exits 65 with one line on stderr and leaves
every row as it was; ``fsck`` exits 65 naming a problem; every reading command
exits cleanly (no traceback) and changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from iommupt_store.cli import cli as cli_group
from iommupt_store.store import Store

from .conftest import run_python_ok, sqlite_dump

MACHINE = "lu"
TOKEN_A, TOKEN_B, TOKEN_C, TOKEN_DEV = 0xA, 0xB, 0xC, 0xD
BDF, OWNER = "0000:3b:00.0", "vfio"
UPPER = 0xFFFF800000000000

BOOT_1 = f"""
import sys
from iommupt_store.store import Store
from iommupt_store.devices import attach
from iommupt_store.domains import domain_alloc
from iommupt_store.liveupdate import liveupdate, preserve_domain
from iommupt_store.liveupdate.sessions import create_session, preserve_device, preserve_domain_in_session

machine = Store(sys.argv[1]).machine({MACHINE!r})
with machine.transaction() as tx:
    create_session(tx, "vm")
    a = domain_alloc(tx, "x86_64")  # sign-extended: the upper half is mapped too
    a.map_range(0x40000000, 0x80001000, 1 << 20)
    a.map_range({UPPER:#x}, 0x200000, 2 << 20)
    b = domain_alloc(tx, "amdv1")
    b.map_range(0x10000, 0x10000, 0x30000)
    c = domain_alloc(tx, "vtdss")
    c.map_range(0x1000, 0x1000, 0x4000)
    attach(tx, {BDF!r}, a.id, owner={OWNER!r})
    preserve_domain_in_session(tx, "vm", a.id, {TOKEN_A})
    preserve_domain_in_session(tx, "vm", c.id, {TOKEN_C})
    preserve_device(tx, "vm", {BDF!r}, {TOKEN_DEV})
    preserve_domain(tx, b.id, {TOKEN_B})
liveupdate(machine)
"""

BOOT_2 = f"""
import sys
from iommupt_store.store import Store
from iommupt_store.liveupdate import restore_domain
from iommupt_store.liveupdate.sessions import retrieve_session

machine = Store(sys.argv[1]).machine({MACHINE!r})
assert machine.boot_number == 2
with machine.transaction() as tx:
    retrieve_session(tx, "vm")
    restore_domain(tx, {TOKEN_C})
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tamper") / "lu.db"
    with Store.init(path) as s:
        s.create_machine(MACHINE, 64 << 20)
    run_python_ok(BOOT_1, str(path))
    run_python_ok(BOOT_2, str(path))
    return path


@pytest.fixture
def world(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "lu.db"
    conn = sqlite3.connect(template)
    try:
        conn.execute(f"VACUUM INTO '{path}'")  # a consistent copy, WAL included
    finally:
        conn.close()
    return path


def tamper(db: Path, *statements: str) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA ignore_check_constraints = ON")
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def _domain(token: int) -> str:
    """SQL: the id of the domain boot 1 preserved under ``token``."""
    return f"(SELECT domain_id FROM handover_entry WHERE token = {token} AND boot_id = 1)"


def _frame(token: int, pick: str = "max") -> str:
    """SQL: a pfn preserved for the domain under ``token`` (the top is the lowest)."""
    owner = f"'iommupt:domain/' || {_domain(token)}"
    return f"(SELECT {pick}(pfn) FROM preservation WHERE boot_id = 1 AND preserved_by = {owner})"


def _entry(token: int) -> str:
    return f"boot_id = 1 AND token = {token}"


def _desc(token: int, path: str, value: str) -> str:
    return f"UPDATE handover_entry SET descriptor = json_set(descriptor, '{path}', {value}) WHERE {_entry(token)}"


A, C = TOKEN_A, TOKEN_C
#: name -> (SQL statements, the token whose restore must be refused)
CASES: dict[str, tuple[tuple[str, ...], int]] = {
    # -- the descriptor and the entry's columns
    "desc-vasz-47": ((_desc(A, "$.vasz", "47"),), A),
    "desc-vasz-40": ((_desc(A, "$.vasz", "40"),), A),
    "desc-top-level-2": ((_desc(A, "$.top_level", "2"),), A),
    "desc-top-level-4": ((_desc(A, "$.top_level", "4"), _desc(A, "$.vasz", "57")), A),
    "desc-top-lower-frame": ((_desc(A, "$.top_table_phys", f"printf('0x%x', {_frame(A)} << 12)"),), A),
    "desc-top-other-domain": ((_desc(A, "$.top_table_phys", f"printf('0x%x', {_frame(TOKEN_B, 'min')} << 12)"),), A),
    "desc-sign-extend-off": ((_desc(A, "$.sign_extend", "json('false')"),), A),
    "desc-format": ((_desc(A, "$.format", "'vtdss'"), _desc(A, "$.sign_extend", "json('false')")), A),
    "desc-ref-count": ((_desc(A, "$.ref_count", "2"),), A),
    "desc-flags-incoming": ((_desc(A, "$.flags", "2"),), A),
    "desc-flags-deleted": ((_desc(A, "$.flags", "1"),), A),
    "desc-extra-field": ((_desc(A, "$.extra", "1"),), A),
    "desc-not-json": ((f"UPDATE handover_entry SET descriptor = 'not json' WHERE {_entry(A)}",), A),
    "desc-json-array": ((f"UPDATE handover_entry SET descriptor = '[1, 2]' WHERE {_entry(A)}",), A),
    "desc-integer": ((f"UPDATE handover_entry SET descriptor = 7 WHERE {_entry(A)}",), A),
    "entry-compatible": ((f"UPDATE handover_entry SET compatible = 'iommu-liveupdate-v0' WHERE {_entry(A)}",), A),
    "entry-token-moved": ((f"UPDATE handover_entry SET token = 0xAA WHERE {_entry(A)}",), A),
    "entry-token-text": ((f"UPDATE handover_entry SET token = 'abc' WHERE {_entry(TOKEN_B)}",), A),
    "entry-token-negative": ((f"UPDATE handover_entry SET token = -1 WHERE {_entry(TOKEN_B)}",), A),
    "entry-kind-device": ((f"UPDATE handover_entry SET kind = 'device' WHERE {_entry(A)}",), A),
    "entry-kind-unknown": ((f"UPDATE handover_entry SET kind = 'gpu' WHERE {_entry(A)}",), A),
    "entry-domain-other": ((f"UPDATE handover_entry SET domain_id = {_domain(TOKEN_B)} WHERE {_entry(A)}",), A),
    "entry-domain-null": ((f"UPDATE handover_entry SET domain_id = NULL WHERE {_entry(A)}",), A),
    "entry-domain-text": ((f"UPDATE handover_entry SET domain_id = 'one' WHERE {_entry(A)}",), A),
    "entry-session-null": ((f"UPDATE handover_entry SET session_id = NULL WHERE {_entry(A)}",), A),
    "entry-session-dangling": ((f"UPDATE handover_entry SET session_id = 99 WHERE {_entry(A)}",), A),
    "entry-boot-moved": ((f"UPDATE handover_entry SET boot_id = 2 WHERE {_entry(A)}",), A),
    "entry-digest": ((f"UPDATE handover_entry SET digest = 'x' WHERE {_entry(A)}",), A),
    "entry-frames-digest": ((f"UPDATE handover_entry SET frames_digest = 'x' WHERE {_entry(A)}",), A),
    "entry-deleted": ((f"DELETE FROM handover_entry WHERE {_entry(TOKEN_B)}",), A),
    "entry-added": (
        (
            "INSERT INTO handover_entry (machine_id, boot_id, token, compatible, descriptor, kind, digest, "
            "frames_digest, created_at) SELECT machine_id, boot_id, 0xEE, compatible, descriptor, kind, digest, "
            f"frames_digest, created_at FROM handover_entry WHERE {_entry(TOKEN_B)}",
        ),
        A,
    ),
    "entry-restored-marker": ((f"UPDATE handover_entry SET restored_boot_id = 2 WHERE {_entry(A)}",), A),
    "entry-restored-domain": ((f"UPDATE handover_entry SET restored_domain_id = 1 WHERE {_entry(A)}",), A),
    "entry-flags-deleted": ((f"UPDATE handover_entry SET flags = 1 WHERE {_entry(A)}",), A),
    "entry-flags-incoming": ((f"UPDATE handover_entry SET flags = 2 WHERE {_entry(A)}",), A),
    "entry-abi-version-1": ((f"UPDATE handover_entry SET abi_version = 1 WHERE {_entry(A)}",), A),
    "entry-abi-version-99": ((f"UPDATE handover_entry SET abi_version = 99 WHERE {_entry(A)}",), A),
    "entry-abi-version-text": ((f"UPDATE handover_entry SET abi_version = 'two' WHERE {_entry(A)}",), A),
    # -- the KHO/LUO records and the writer's kernel profile
    "boot-profile": (("UPDATE boot SET kernel_profile = 'lu-v3' WHERE number = 1",), A),
    "kexec-count": (("UPDATE kho_root SET kexec_count = 5 WHERE boot_id = 1",), A),
    "kexec-release": (("UPDATE kho_root SET previous_release = '6.1.0' WHERE boot_id = 1",), A),
    "kho-compatible": (("UPDATE kho_root SET compatible = 'kho-v2' WHERE boot_id = 1",), A),
    "kho-writer": (("UPDATE kho_root SET writer_profile = 'lu-v3' WHERE boot_id = 1",), A),
    "luo-compatible": (("UPDATE kho_root SET luo_compatible = 'luo-v6' WHERE boot_id = 1",), A),
    "kho-root-deleted": (("DELETE FROM luo_flb WHERE boot_id = 1", "DELETE FROM kho_root WHERE boot_id = 1"), A),
    "flb-count": (("UPDATE luo_flb SET count = 9 WHERE boot_id = 1",), A),
    # -- the seal
    "seal-digest-edited": (("UPDATE boot SET handover_digest = 'x' WHERE number = 1",), A),
    "seal-digest-removed": (("UPDATE boot SET handover_digest = NULL WHERE number = 1",), A),
    # -- preservation records of A's frames
    "pres-pfn": ((f"UPDATE preservation SET pfn = 0x3000 WHERE boot_id = 1 AND pfn = {_frame(A)}",), A),
    "pres-pfn-text": ((f"UPDATE preservation SET pfn = 'abc' WHERE boot_id = 1 AND pfn = {_frame(A)}",), A),
    "pres-order": ((f"UPDATE preservation SET page_order = 1 WHERE boot_id = 1 AND pfn = {_frame(A)}",), A),
    "pres-order-19": ((f"UPDATE preservation SET page_order = 19 WHERE boot_id = 1 AND pfn = {_frame(A)}",), A),
    "pres-owner": ((f"UPDATE preservation SET preserved_by = 'iommupt:domain/99' WHERE pfn = {_frame(A)}",), A),
    "pres-hash": ((f"UPDATE preservation SET content_hash = 'x' WHERE boot_id = 1 AND pfn = {_frame(A)}",), A),
    "pres-boot": ((f"UPDATE preservation SET boot_id = 2 WHERE boot_id = 1 AND pfn = {_frame(A)}",), A),
    "pres-restored": ((f"UPDATE preservation SET restored_boot_id = 2 WHERE boot_id = 1 AND pfn = {_frame(A)}",), A),
    "pres-deleted": ((f"DELETE FROM preservation WHERE boot_id = 1 AND pfn = {_frame(A)}",), A),
    "pres-added": (
        (
            "INSERT INTO preservation (machine_id, pfn, page_order, boot_id, preserved_by, content_hash, created_at) "
            f"SELECT machine_id, 0x3000, 0, 1, preserved_by, content_hash, created_at FROM preservation "
            f"WHERE boot_id = 1 AND pfn = {_frame(A)}",
        ),
        A,
    ),
    # -- A's frames (pages)
    "page-bytes": ((f"UPDATE page SET contents = zeroblob(4096) WHERE pfn = {_frame(A)}",), A),
    "page-contents-text": ((f"UPDATE page SET contents = printf('%.4096c', 'x') WHERE pfn = {_frame(A)}",), A),
    "page-contents-short": ((f"UPDATE page SET contents = x'00' WHERE pfn = {_frame(A)}",), A),
    "page-contents-integer": ((f"UPDATE page SET contents = 4096 WHERE pfn = {_frame(A)}",), A),
    "page-other-domain": ((f"UPDATE page SET domain_id = {_domain(TOKEN_B)} WHERE pfn = {_frame(A)}",), A),
    "page-level": ((f"UPDATE page SET level = 2 WHERE pfn = {_frame(A)}",), A),
    "page-deleted": ((f"DELETE FROM page WHERE pfn = {_frame(A)}",), A),
    "page-pfn-text": ((f"UPDATE page SET pfn = 'abc' WHERE pfn = {_frame(A)}",), A),
    "page-level-text": ((f"UPDATE page SET level = 'top' WHERE pfn = {_frame(A)}",), A),
    # -- the preserved domain's row
    "domain-vasz": ((f"UPDATE domain SET max_vasz_lg2 = 47 WHERE id = {_domain(A)}",), A),
    "domain-top-level": ((f"UPDATE domain SET top_level = 2 WHERE id = {_domain(A)}",), A),
    "domain-top-phys": ((f"UPDATE domain SET top_phys = {_frame(A)} << 12 WHERE id = {_domain(A)}",), A),
    "domain-features-not-json": ((f"UPDATE domain SET features = 'not json' WHERE id = {_domain(A)}",), A),
    "domain-features-unknown": ((f"UPDATE domain SET features = '[\"BOGUS\"]' WHERE id = {_domain(A)}",), A),
    "domain-features-not-list": ((f"UPDATE domain SET features = '\"SIGN_EXTEND\"' WHERE id = {_domain(A)}",), A),
    "domain-format": ((f"UPDATE domain SET format = 'vtdss' WHERE id = {_domain(A)}",), A),
    "domain-format-unknown": ((f"UPDATE domain SET format = 'mock' WHERE id = {_domain(A)}",), A),
    "domain-state-live": ((f"UPDATE domain SET state = 'live' WHERE id = {_domain(A)}",), A),
    "domain-state-unknown": ((f"UPDATE domain SET state = 'bogus' WHERE id = {_domain(A)}",), A),
    # -- boot history
    "boot-gap": (("UPDATE boot SET number = 3 WHERE number = 2",), A),
    "boot-renumbered": (("UPDATE boot SET number = number + 5",), A),
    "boot-number-text": (("UPDATE boot SET number = 'one' WHERE number = 1",), A),
    "boot-two-running": (("UPDATE boot SET end_kind = NULL, ended_at = NULL WHERE number = 1",), A),
    "boot-ended-cold": (("UPDATE boot SET end_kind = 'cold' WHERE number = 1",), A),
    "boot-end-time-missing": (("UPDATE boot SET ended_at = NULL WHERE number = 1",), A),
    "boot-end-kind-unknown": (("UPDATE boot SET end_kind = 'warm' WHERE number = 1",), A),
    "boot-started-garbage": (("UPDATE boot SET started_at = 'garbage' WHERE number = 1",), A),
    "boot-running-not-last": (
        (
            "UPDATE boot SET end_kind = 'cold', ended_at = started_at WHERE number = 2",
            "UPDATE boot SET end_kind = NULL, ended_at = NULL, handover_digest = NULL WHERE number = 1",
        ),
        A,
    ),
    # -- the session
    "session-unretrieved": (("UPDATE luo_session SET state = 'sealed' WHERE name = 'vm'",), A),
    "session-finished-no-time": (("UPDATE luo_session SET state = 'finished' WHERE name = 'vm'",), A),
    "session-state-unknown": (("UPDATE luo_session SET state = 'bogus' WHERE name = 'vm'",), A),
    "session-renamed": (("UPDATE luo_session SET name = 'vm2' WHERE name = 'vm'",), A),
    "session-other-boot": (("UPDATE luo_session SET boot_id = 2 WHERE name = 'vm'",), A),
    "session-name-blob": (("UPDATE luo_session SET name = x'00ff' WHERE name = 'vm'",), A),
    "session-dangling-boot": (("UPDATE luo_session SET boot_id = 9 WHERE name = 'vm'",), A),
    # -- the preserved device
    "device-bdf": ((f"UPDATE device SET bdf = '0000:3b:00.1' WHERE bdf = '{BDF}'",), A),
    "device-owner": ((f"UPDATE device SET owner = 'intruder' WHERE bdf = '{BDF}'",), A),
    "device-did": ((f"UPDATE device SET did = 77 WHERE bdf = '{BDF}'",), A),
    "device-domain": ((f"UPDATE device SET domain_id = {_domain(TOKEN_B)} WHERE bdf = '{BDF}'",), A),
    "device-deleted": ((f"DELETE FROM device WHERE bdf = '{BDF}'",), A),
    "device-did-text": ((f"UPDATE device SET did = 'seven' WHERE bdf = '{BDF}'",), A),
    "device-bdf-integer": ((f"UPDATE device SET bdf = 42 WHERE bdf = '{BDF}'",), A),
    "device-entry-token": (
        (
            "UPDATE handover_entry SET descriptor = json_set(descriptor, '$.domain_token', '0xc') "
            f"WHERE {_entry(TOKEN_DEV)}",
        ),
        A,
    ),
    "device-entry-device": ((f"UPDATE handover_entry SET device_id = 42 WHERE {_entry(TOKEN_DEV)}",), A),
    # -- the entry boot 2 already restored
    "restored-domain-null": ((f"UPDATE handover_entry SET restored_domain_id = NULL WHERE {_entry(C)}",), C),
    "restored-marker-cleared": (
        (f"UPDATE handover_entry SET restored_boot_id = NULL, restored_domain_id = NULL WHERE {_entry(C)}",),
        C,
    ),
    "restored-as-wrong-domain": (
        (f"UPDATE handover_entry SET restored_domain_id = {_domain(A)} WHERE {_entry(C)}",),
        C,
    ),
    "restored-in-boot-1": ((f"UPDATE handover_entry SET restored_boot_id = 1 WHERE {_entry(C)}",), C),
    "restored-frames-cleared": ((f"UPDATE preservation SET restored_boot_id = NULL WHERE pfn = {_frame(C)}",), C),
}

#: malformed values restore never reads: it may succeed; fsck and the readers must still cope
RESTORE_UNAFFECTED = {"boot-started-garbage"}

#: commands that only read: on a tampered database they may refuse, never crash, never change anything
READERS: list[tuple[str, ...]] = [
    ("status",),
    ("status", "--json"),
    ("domains", "--all"),
    ("domains", "--json"),
    ("show", "1"),
    ("translate", "1", "0x40000000", str(UPPER)),
    ("translate", "4", "0x1000"),
    ("handover",),
    ("handover", "--json"),
    ("sessions",),
    ("sessions", "--json"),
    ("devices",),
    ("devices", "--json"),
    ("device", "translate", BDF, "0x40000000"),
    ("fsck", "--json"),
]


def invoke(db: Path, *args: str) -> tuple[int, str, str]:
    # catch_exceptions=False: a Python exception fails the test instead of becoming an exit code
    result = CliRunner().invoke(cli_group, ["--db", str(db), "-m", MACHINE, *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_untampered_world_restores_and_passes_fsck(world: Path) -> None:
    code, out, err = invoke(world, "fsck", "--json")
    assert code == 0, (out, err)
    assert json.loads(out)["problems"] == []
    for args in READERS:
        code, _, err = invoke(world, *args)
        assert code == 0, (args, err)
    code, out, err = invoke(world, "restore", "--token", hex(TOKEN_A), "--json")
    assert code == 0, err
    code, out, err = invoke(world, "fsck", "--json")
    assert code == 0, (out, err)


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_is_refused_reported_and_never_crashes(world: Path, case: str) -> None:
    statements, token = CASES[case]
    tamper(world, *statements)
    before = sqlite_dump(world)

    if case not in RESTORE_UNAFFECTED:
        code, _, err = invoke(world, "restore", "--token", hex(token))
        assert code == 65, f"restore of a tampered handover exited {code}: {err}"
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
        assert sqlite_dump(world) == before

    code, out, err = invoke(world, "fsck", "--json")
    assert code == 65, f"fsck exited {code} on a tampered handover: {out} {err}"
    if out:
        assert json.loads(out)["problems"]

    for args in READERS:
        code, _, err = invoke(world, *args)
        assert code in (0, 1, 65), (args, code, err)
        assert "Traceback" not in err
    assert sqlite_dump(world) == before
