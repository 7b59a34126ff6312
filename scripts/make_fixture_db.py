"""Write the fixture database the cross-process migration tests start from.

    python scripts/make_fixture_db.py [OUT_DIR]      (default: tests/data)

It drives the real command line, one process per command, on a fresh SQLite
file: a 64 MiB machine with one x86_64 domain holding mappings of every page
size this small machine holds (4K and 2M, read-only and read-write, both halves), a
device attached to it, and a LUO session ``vm1`` that preserves the domain
(token 0x10) and the device (token 0x11); then ``liveupdate`` seals boot 1.
The database is left at the schema revision of the code that ran this script
(0006 for the committed file) and compacted with ``VACUUM``.

Beside it, ``<name>.json`` records the revision and, for a set of IOVAs
(first, middle and last byte of every mapping, and holes), what the hardware
walker translated them to before the kexec: the next boot must translate the
restored domain exactly the same way.

Regenerate only when the starting revision of the tests must change: the file
stands for databases users already have.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

NAME = "rev0006-sealed"
MAPPINGS = [  # (iova, paddr, length, prot)
    (0x0, 0x20_0000, 0x20_0000, "rw"),  # one 2M leaf
    (0x40_0000, 0x100_0000, 0x1_0000, "r"),  # 16 x 4K, read-only
    (0x7FFF_FFFF_0000, 0x180_0000, 0x4000, "rw"),  # at the top of the lower half
    (0xFFFF_8000_0000_0000, 0x190_0000, 0x2000, "rw"),  # the upper half (sign-extended)
    (0x1234_5000, 0x1A0_0000, 0x3000, "rw"),
]
HOLES = [0x30_0000, 0x8000_0000, 0x7FFF_FFFF_8000]


def probes() -> list[int]:
    out: list[int] = []
    for iova, _paddr, length, _prot in MAPPINGS:
        out += [iova, iova + length // 2 + 0x123, iova + length - 1]
    return out + HOLES


def cli(db: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOMMUPT_")}
    r = subprocess.run(
        [sys.executable, "-m", "iommupt_store", "--db", str(db), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if r.returncode:
        raise SystemExit(f"iommupt-store {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def build(db: Path) -> dict[str, object]:
    cli(db, "init", "--mem", "64M")
    cli(db, "domain", "create", "x86_64")
    for iova, paddr, length, prot in MAPPINGS:
        cli(db, "map", "1", hex(iova), hex(paddr), hex(length), "--prot", prot)
    translated = json.loads(cli(db, "translate", "1", *map(hex, probes()), "--json"))
    cli(db, "device", "attach", "0000:3b:00.1", "1", "--owner", "vfio-vm1")
    cli(db, "session", "create", "vm1")
    cli(db, "preserve", "1", "--token", "0x10", "--session", "vm1")
    cli(db, "device", "preserve", "0000:3b:00.1", "--session", "vm1", "--token", "0x11")
    cli(db, "liveupdate")
    revision = json.loads(cli(db, "db", "current", "--json"))["current"]
    return {
        "revision": revision,
        "machine": "default",
        "domain_id": 1,
        "session": "vm1",
        "domain_token": "0x10",
        "device": "0000:3b:00.1",
        "device_token": "0x11",
        "owner": "vfio-vm1",
        "translations": [
            {"iova": t["iova"], "phys": t["phys"], "page_size": t["page_size"], "writable": t["writable"]}
            for t in translated
        ],
    }


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work.db"
        meta = build(work)
        target = out_dir / f"{NAME}.db"
        target.unlink(missing_ok=True)
        conn = sqlite3.connect(work, isolation_level=None)
        conn.execute("VACUUM INTO ?", (str(target),))  # compact, one file (no WAL beside it)
        conn.close()
    conn = sqlite3.connect(target, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")  # a committed file must not need a -wal to be whole
    conn.close()
    (out_dir / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{target} ({target.stat().st_size} bytes) at revision {meta['revision']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests" / "data")
