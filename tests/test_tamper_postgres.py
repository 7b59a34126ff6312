"""Tampering with a stored live update on PostgreSQL (see ``test_tamper.py``).

PostgreSQL enforces column types and CHECK constraints, so only edits of
well-typed values are possible: those are refused the same way. Runs only
when ``IOMMUPT_TEST_PG_URL`` names a server; the world is built once by real
processes in a template database, and each case edits a copy of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from iommupt_store.cli import cli as cli_group

PG_URL = os.environ.get("IOMMUPT_TEST_PG_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason="IOMMUPT_TEST_PG_URL is not set"),
]

BDF = "0000:3b:00.0"
A, B = 0xA, 0xB


def _admin() -> str:
    assert PG_URL
    return PG_URL.replace("postgresql+psycopg://", "postgresql://")


def _url(name: str) -> str:
    assert PG_URL
    return f"{PG_URL.rpartition('/')[0]}/{name}"


def _run(url: str, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "iommupt_store", "--db", url, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, (args, proc.stderr)


@pytest.fixture(scope="module")
def template() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    name = f"iommupt_tpl_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_admin(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = _url(name)
    # boot 1, one process per command: a sign-extended domain with its device in a session, and one more
    for args in [
        ("init", "--mem", "256M"),
        ("domain", "create", "x86_64"),
        ("map", "1", "0x40000000", "0x80001000", "1M"),
        ("map", "1", "0xffff800000000000", "0x200000", "2M"),
        ("domain", "create", "amdv1"),
        ("map", "2", "0x10000", "0x10000", "0x30000"),
        ("device", "attach", BDF, "1", "--owner", "vfio"),
        ("session", "create", "vm"),
        ("preserve", "1", "--token", hex(A), "--session", "vm"),
        ("device", "preserve", BDF, "--session", "vm", "--token", "0xd"),
        ("preserve", "2", "--token", hex(B)),
        ("liveupdate",),
        ("session", "retrieve", "vm"),  # boot 2
    ]:
        _run(url, *args)
    yield name
    with psycopg.connect(_admin(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def world(template: str) -> Iterator[str]:
    import psycopg

    name = f"iommupt_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    yield _url(name)
    with psycopg.connect(_admin(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _entry(token: int) -> str:
    return f"boot_id = 1 AND token = {token}"


def _desc(token: int, path: str, value: str) -> str:
    return (
        f"UPDATE handover_entry SET descriptor = jsonb_set(descriptor::jsonb, '{{{path}}}', '{value}')::json "
        f"WHERE {_entry(token)}"
    )


_TOP_OF_B = "(SELECT top_phys FROM domain WHERE id = 2)"
_FRAME_OF_A = "(SELECT max(pfn) FROM preservation WHERE preserved_by = 'iommupt:domain/1')"

CASES: dict[str, str] = {
    "desc-vasz-47": _desc(A, "vasz", "47"),
    "desc-top-level": _desc(A, "top_level", "2"),
    "desc-sign-extend": _desc(A, "sign_extend", "false"),
    "desc-ref-count": _desc(A, "ref_count", "2"),
    "desc-flags": _desc(A, "flags", "2"),
    "desc-top-other-domain": (
        f"UPDATE handover_entry SET descriptor = jsonb_set(descriptor::jsonb, '{{top_table_phys}}', "
        f"to_jsonb('0x' || to_hex({_TOP_OF_B})))::json WHERE {_entry(A)}"
    ),
    "entry-token": f"UPDATE handover_entry SET token = 170 WHERE {_entry(A)}",
    "entry-kind": f"UPDATE handover_entry SET kind = 'device' WHERE {_entry(A)}",
    "entry-compatible": f"UPDATE handover_entry SET compatible = 'x' WHERE {_entry(A)}",
    "entry-domain": f"UPDATE handover_entry SET domain_id = 2 WHERE {_entry(A)}",
    "entry-session": f"UPDATE handover_entry SET session_id = NULL WHERE {_entry(A)}",
    "entry-digest": f"UPDATE handover_entry SET digest = md5('x') WHERE {_entry(A)}",
    "seal": "UPDATE boot SET handover_digest = md5('x') WHERE number = 1",
    "pres-hash": f"UPDATE preservation SET content_hash = md5('x') WHERE pfn = {_FRAME_OF_A}",
    "pres-order": f"UPDATE preservation SET page_order = 1 WHERE pfn = {_FRAME_OF_A}",
    "pres-owner": f"UPDATE preservation SET preserved_by = 'iommupt:domain/2' WHERE pfn = {_FRAME_OF_A}",
    "pres-restored": f"UPDATE preservation SET restored_boot_id = 2 WHERE pfn = {_FRAME_OF_A}",
    "page-bytes": f"UPDATE page SET contents = decode(repeat('00', 4096), 'hex') WHERE pfn = {_FRAME_OF_A}",
    "domain-vasz": "UPDATE domain SET max_vasz_lg2 = 47 WHERE id = 1",
    "domain-features": "UPDATE domain SET features = '[\"BOGUS\"]' WHERE id = 1",
    "domain-features-not-list": "UPDATE domain SET features = '\"SIGN_EXTEND\"' WHERE id = 1",
    "domain-state": "UPDATE domain SET state = 'live' WHERE id = 1",
    "boot-gap": "UPDATE boot SET number = 5 WHERE number = 2",
    "boot-ended-cold": "UPDATE boot SET end_kind = 'cold' WHERE number = 1",
    "session-state": "UPDATE luo_session SET state = 'sealed' WHERE name = 'vm'",
    "session-renamed": "UPDATE luo_session SET name = 'vm2' WHERE name = 'vm'",
    "device-did": f"UPDATE device SET did = 77 WHERE bdf = '{BDF}'",
    "device-owner": f"UPDATE device SET owner = 'intruder' WHERE bdf = '{BDF}'",
}

READERS = [("status", "--json"), ("domains", "--all"), ("handover", "--json"), ("sessions",), ("devices",)]


def invoke(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_group, ["--db", url, *args], catch_exceptions=False)
    return result.exit_code, result.stderr


def dump(url: str) -> dict[str, list[Any]]:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return {t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"').fetchall())) for t in sorted(tables)}


def test_untampered_world_restores(world: str) -> None:
    assert invoke(world, "fsck")[0] == 0
    assert invoke(world, "restore", "--token", hex(A))[0] == 0


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_on_postgres(world: str, case: str) -> None:
    import psycopg

    with psycopg.connect(world.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute(CASES[case])
    before = dump(world)
    code, err = invoke(world, "restore", "--token", hex(A))
    assert code == 65, err
    assert invoke(world, "fsck")[0] == 65
    for args in READERS:
        code, err = invoke(world, *args)
        assert code in (0, 1, 65), (args, err)
    assert dump(world) == before
