#!/usr/bin/env python3
"""Benchmark: a live update of a 1 GiB domain mapped with 4 KiB pages (x86_64).

Figures (median of --repeat runs, each on a fresh SQLite file):
  preserve_seal        in-process: preserve the domain (515 frames) + liveupdate (checks, seal)
  raw_preserve         the raw baseline, same process: sqlite3 reads every frame row of the
                       domain and inserts one small row per frame
  restore_verify_free  wall time of a whole new process: open the machine (boot 2), restore,
                       check every one of the 262,144 translations (verify_domain), free
The last two lines are exactly:
  preserve_seal ratio_vs_raw=<float>          (target <= 5)
  restore_verify_free wall_s=<float>          (target <= 1.5 on a 2-core machine)

Usage: python scripts/bench_liveupdate.py [--repeat N]
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
PA = 0x100001000  # only 4 KiB aligned: every page is 4 KiB
TOKEN = 0x51

CHILD = f"""
import sys
from iommupt_store import Store
from iommupt_store.domains import frame_counts
from iommupt_store.liveupdate import restore_domain
from iommupt_store.verify import ExpectedRun, verify_domain
machine = Store(sys.argv[1]).machine("bench")
with machine.transaction() as tx:
    dom = restore_domain(tx, {TOKEN})
    report = verify_domain(tx, dom.id, [ExpectedRun(iova=0, phys={PA}, length={GIB})])
    if not report.ok or report.summary.translations != 262144 or report.summary.leaf_entries != 262144:
        sys.exit(f"bad translations: {{report}}")
    dom.free()
    if sum(frame_counts(tx).values()):
        sys.exit("frames left after free")
"""


def build(path: Path) -> tuple[object, int]:
    from iommupt_store import Store
    from iommupt_store.domains import domain_alloc

    store = Store.init(path)
    store.create_machine("bench", 64 * GIB)
    machine = store.machine("bench")
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0, PA, GIB)
    return machine, dom.id


def preserve_seal(machine: object, domain_id: int) -> float:
    from iommupt_store.liveupdate import liveupdate, preserve_domain

    t0 = time.perf_counter()
    with machine.transaction() as tx:  # type: ignore[attr-defined]
        preserve_domain(tx, domain_id, TOKEN)
    liveupdate(machine)  # type: ignore[arg-type]
    return time.perf_counter() - t0


def raw_preserve(db: Path, domain_id: int, scratch: Path) -> float:
    t0 = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"ATTACH '{scratch}' AS raw")
    conn.execute("PRAGMA raw.journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS raw.pres (pfn INTEGER PRIMARY KEY, hash TEXT)")
    conn.execute("BEGIN IMMEDIATE")
    rows = conn.execute("SELECT pfn, contents FROM page WHERE domain_id = ?", (domain_id,)).fetchall()
    conn.executemany(
        "INSERT INTO raw.pres VALUES (?, ?)", [(pfn, hashlib.sha256(data).hexdigest()) for pfn, data in rows]
    )
    conn.execute("COMMIT")
    conn.close()
    if len(rows) != 515:
        raise SystemExit(f"raw baseline read {len(rows)} frames, expected 515")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    seal, raw, wall = [], [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            db = Path(d) / "bench.db"
            machine, domain_id = build(db)
            raw.append(raw_preserve(db, domain_id, Path(d) / "raw.db"))
            seal.append(preserve_seal(machine, domain_id))
            machine.store.close()  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CHILD, str(db)], capture_output=True, text=True)
            wall.append(time.perf_counter() - t0)
            if proc.returncode:
                raise SystemExit(f"restore process failed: {proc.stderr}")
    s, r, w = statistics.median(seal), statistics.median(raw), statistics.median(wall)
    print(f"raw_preserve         {r * 1e3:8.1f} ms  (sqlite3: read 515 frame rows, insert 515 small rows)")
    print(f"preserve_seal        {s * 1e3:8.1f} ms  (preserve 515 frames + seal with full checks)")
    print(f"restore_verify_free  {w * 1e3:8.1f} ms  (new process: restore, 262144 translations checked, free)")
    print(f"preserve_seal ratio_vs_raw={s / r:.2f}")
    print(f"restore_verify_free wall_s={w:.3f}")


if __name__ == "__main__":
    main()
