"""A real Linux 7.3.4 handover (``tests/data/kho-7.3.4``, captured at kexec) fits the handover records.

The root FDT is parsed here (a flattened device tree is a small documented format); the LUO blob,
its sessions, files and FLBs, kexec-metadata and the preserved-memory map come from the capture's
decoded walk (``handover.txt``). Everything is stored as the handover of a machine's boot through
the models and tables of the schema, read back, validated and checked against the capture.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from iommupt_store.abi.records import (
    KexecMetadata,
    KhoRootRecord,
    KhoSubnodeRecord,
    LuoFileRecord,
    LuoFlbRecord,
    LuoHeader,
    LuoSessionRecord,
    read_records,
    write_records,
)
from iommupt_store.db.models import Preservation
from iommupt_store.store import Store

DATA = Path(__file__).parent / "data" / "kho-7.3.4"
FDT_MAGIC = 0xD00DFEED
BEGIN_NODE, END_NODE, PROP, NOP, END = 1, 2, 3, 4, 9


def parse_fdt(blob: bytes) -> dict[str, dict[str, bytes]]:
    """Every node of a flattened device tree as {path: {property: raw value}}."""
    magic, total, off_struct, off_strings = struct.unpack_from(">IIII", blob)
    assert magic == FDT_MAGIC and total == len(blob)
    nodes: dict[str, dict[str, bytes]] = {}
    path: list[str] = []
    pos = off_struct
    while True:
        (token,) = struct.unpack_from(">I", blob, pos)
        pos += 4
        if token == BEGIN_NODE:
            end = blob.index(b"\0", pos)
            path.append(blob[pos:end].decode())
            nodes["/" + "/".join(p for p in path if p)] = {}
            pos = (end + 4) & ~3
        elif token == END_NODE:
            path.pop()
        elif token == PROP:
            length, nameoff = struct.unpack_from(">II", blob, pos)
            pos += 8
            name_end = blob.index(b"\0", off_strings + nameoff)
            name = blob[off_strings + nameoff : name_end].decode()
            nodes["/" + "/".join(p for p in path if p)][name] = blob[pos : pos + length]
            pos = (pos + length + 3) & ~3
        elif token == NOP:
            continue
        else:
            assert token == END
            return nodes


def _string(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode()


def _u64_le(raw: bytes) -> int:
    """KHO stores its u64 properties little-endian, not as big-endian FDT cells."""
    (value,) = struct.unpack("<Q", raw)
    return int(value)


def capture_records() -> tuple[KhoRootRecord, list[tuple[int, int]]]:
    """The capture as handover records, and its preserved ranges (physical address, order)."""
    root = parse_fdt((DATA / "handover.fdt").read_bytes())
    memblock = parse_fdt((DATA / "handover.sub_memblock.fdt").read_bytes())
    text = (DATA / "handover.txt").read_text()
    kexec = re.search(r"kexec-metadata @\S+ size \d+: version=(\d+) previous_release='([^']*)' kexec_count=(\d+)", text)
    luo = re.search(r"LUO @\S+ size \d+: compatible='([^']*)' liveupdate_num=(\d+)", text)
    assert kexec and luo
    sessions: list[dict[str, Any]] = []
    for line in text.splitlines():
        if m := re.match(r"\s+session '([^']*)'", line):
            sessions.append({"name": m[1], "files": []})
        elif m := re.match(r"\s+file compatible='([^']*)' token=(0x[0-9a-f]+) data_pa=(0x[0-9a-f]+)", line):
            sessions[-1]["files"].append(LuoFileRecord(compatible=m[1], token=int(m[2], 16), data=int(m[3], 16)))
    flbs = [
        LuoFlbRecord(name=m[1], data=int(m[2], 16), count=int(m[3]))
        for m in re.finditer(r"flb '([^']*)' data=(0x[0-9a-f]+) count=(\d+)", text)
    ]
    ranges = [(int(m[1], 16), int(m[2])) for m in re.finditer(r"^\s+(0x[0-9a-f]+) order (\d+)", text, re.MULTILINE)]
    subnodes = [
        KhoSubnodeRecord(
            name=path.lstrip("/"),
            preserved_data=_u64_le(props["preserved-data"]),
            blob_size=_u64_le(props["blob-size"]),
            compatible=_string(memblock["/"]["compatible"]) if path == "/memblock" else None,
        )
        for path, props in root.items()
        if path != "/"
    ]
    record = KhoRootRecord(
        compatible=_string(root["/"]["compatible"]),
        preserved_memory_map=_u64_le(root["/"]["preserved-memory-map"]),
        kexec=KexecMetadata(version=int(kexec[1]), previous_release=kexec[2], kexec_count=int(kexec[3])),
        luo=LuoHeader(compatible=luo[1], liveupdate_num=int(luo[2])),
        subnodes=subnodes,
        sessions=[LuoSessionRecord(name=s["name"], files=s["files"]) for s in sessions],
        flbs=flbs,
    )
    return record, ranges


def test_the_captured_handover_is_stored_as_a_boots_handover(db_path: Path) -> None:
    record, ranges = capture_records()
    store = Store.init(db_path)
    store.create_machine("real", 1 << 30)
    machine = store.machine("real")
    with machine.transaction() as tx:
        write_records(tx.conn, machine.id, machine.boot_id, record)
        for pa, order in ranges:
            # the capture lists the ranges; their contents are not part of this test vector
            tx.conn.execute(
                insert(Preservation).values(
                    machine_id=machine.id,
                    boot_id=machine.boot_id,
                    pfn=pa >> 12,
                    page_order=order,
                    preserved_by="kho:preserved-memory-map",
                    content_hash=hashlib.sha256(b"").hexdigest(),
                )
            )
    with machine.transaction(write=False) as tx:
        back = read_records(tx.conn, machine.boot_id)
        stored_ranges = tx.conn.execute(
            select(Preservation.pfn, Preservation.page_order).where(Preservation.boot_id == machine.boot_id)
        ).all()
    store.close()
    # validated by the models on the way out; stored records come back in name order
    in_order = record.model_copy(
        update={key: sorted(getattr(record, key), key=lambda r: r.name) for key in ("subnodes", "sessions", "flbs")}
    )
    assert back == in_order
    assert back is not None and back.kexec is not None and back.luo is not None
    assert back.compatible == "kho-v4" and back.preserved_memory_map == 0x2C6000
    assert (back.kexec.version, back.kexec.previous_release, back.kexec.kexec_count) == (1, "7.3.4", 1)
    assert (back.luo.compatible, back.luo.liveupdate_num) == ("luo-v5", 1)
    assert {(s.name, s.blob_size, s.compatible) for s in back.subnodes} == {
        ("LUO", 0x20, None),
        ("kexec-metadata", 0x49, None),
        ("memblock", 0xD6, "memblock-v1"),
    }
    files = {(s.name, f.compatible, f.token) for s in back.sessions for f in s.files}
    assert files == {("kexec_simple_state", "memfd-v2", 0x3E7), ("test-session", "memfd-v2", 0x1A)}
    assert [(f.name, f.count) for f in back.flbs] == [(f"liveupdate-test-flb-v{i}", 2) for i in range(3)]
    assert back.flbs[0].data == 0xFEEDF00DCAFEBEE0
    assert len(stored_ranges) == 23
    assert sorted((pfn << 12, order) for pfn, order in stored_ranges) == sorted(ranges)
    assert sorted(order for _, order in ranges if order) == [2, 2, 3, 4, 5, 6, 7]
