"""The SQL helpers ``iommupt-store query`` registers on SQLite, and the command's edges."""

from __future__ import annotations

import json
import struct

from iommupt_store.query import hex64, le64, pte_decode, sha256
from tests.conftest import InvokeCli


def test_le64_reads_entries_as_twos_complement() -> None:
    blob = struct.pack("<3Q", 0x1027, 1 << 63 | 0x1000, 0)
    assert [le64(blob, i) for i in range(3)] == [0x1027, -(1 << 63) + 0x1000, 0]
    assert le64(blob, 3) is None and le64(blob, -1) is None and le64(None, 0) is None
    assert hex64(le64(blob, 1)) == "0x8000000000001000"


def test_pte_decode_says_what_an_entry_means() -> None:
    leaf = json.loads(pte_decode("vtdss", 1, 0x4020_0083) or "")
    assert (leaf["type"], leaf["addr"], leaf["page_size"], leaf["readable"], leaf["writable"]) == (
        "leaf",
        "0x40200000",
        2 << 20,
        True,
        True,
    )
    table = json.loads(pte_decode("x86_64", 3, 0x101027) or "")
    assert (table["type"], table["addr"]) == ("table", "0x101000")
    assert json.loads(pte_decode("amdv1", 0, 0) or "")["type"] == "empty"
    assert "error" in json.loads(pte_decode("nosuch", 0, 1) or "")
    assert sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_query_command(cli: InvokeCli) -> None:
    assert cli("init", "--mem", "16M").exit_code == 0
    assert cli("domain", "create", "vtdss").exit_code == 0
    assert cli("map", "1", "0x200000", "0x40200000", "2M").exit_code == 0
    one = cli("query", "SELECT count(*) FROM mapping")
    assert (one.exit_code, one.stdout.strip()) == (0, "1")
    rows = json.loads(cli("query", "--json", "SELECT domain_id, iova, page_size FROM mapping").stdout)
    assert rows == [{"domain_id": 1, "iova": 0x200000, "page_size": 2 << 20}]
    csv = cli("query", "--csv", "SELECT level, entries_used FROM table_frame ORDER BY level DESC").stdout
    assert csv.splitlines()[0] == "level,entries_used"
    for bad in ("DELETE FROM page", "SELEC 1", "", "CREATE TABLE x (a)"):
        r = cli("query", bad)
        assert r.exit_code == 1 and r.stderr.startswith("error: EINVAL"), (bad, r.stderr)
    assert cli("query", "--json", "--csv", "SELECT 1").exit_code == 2
