#!/usr/bin/env python3
"""Benchmark: whole-domain verification against the raw walk of the same frames.

One x86_64 domain of --gib GiB mapped in 4 KiB pages (one SQLite file), then,
--repeat times, two fresh processes on it, each timing its own work (after its
imports):
  raw     sqlite3 reads every frame of the domain and walks them from the top,
          decoding every entry with array and the format's bit masks
  verify  Store.observe + verify_domain: every translation checked against the
          recorded mapping runs (frames read in bounded batches, runs compared)
The last line is exactly:
  verify ratio_vs_raw=<float>          (target <= 3)

Usage: python scripts/bench_verify.py [--gib N] [--repeat N] [--keep PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
PA = 0x100001000  # only 4 KiB aligned: every page is 4 KiB

#: the raw baseline: minimal code, the real x86_64 masks, walking from the top
RAW = """
import json, sqlite3, sys, time
from array import array
t0 = time.perf_counter()
conn = sqlite3.connect(sys.argv[1])
domain_id = int(sys.argv[2])
top_phys, top_level = conn.execute("SELECT top_phys, top_level FROM domain WHERE id = ?", (domain_id,)).fetchone()
frames = dict(conn.execute("SELECT pfn, contents FROM page WHERE domain_id = ?", (domain_id,)))
P, PS, ADDR = 1, 1 << 7, ((1 << 52) - 1) & ~0xFFF
leaves = mapped = 0

def walk(phys, level, base):
    global leaves, mapped
    shift = 12 + 9 * level
    for i, raw in enumerate(array("Q", frames[phys >> 12])):
        if not raw & P:
            continue
        addr = raw & ADDR
        if level == 0 or raw & PS:
            leaves += 1
            mapped += 1 << shift
        else:
            walk(addr, level - 1, base + (i << shift))

walk(top_phys, top_level, 0)
print(json.dumps({"s": time.perf_counter() - t0, "frames": len(frames), "leaves": leaves, "bytes": mapped}))
"""

VERIFY = """
import json, sys, time
from iommupt_store import Store
from iommupt_store.verify import verify_domain
t0 = time.perf_counter()
with Store(sys.argv[1]) as store, store.observe("bench").transaction(write=False) as tx:
    report = verify_domain(tx, int(sys.argv[2]))
if not report.ok:
    sys.exit(f"verify found differences: {report.differences}")
s = report.summary
took = time.perf_counter() - t0
print(json.dumps({"s": took, "frames": s.frames_read, "leaves": s.leaf_entries, "bytes": s.bytes_mapped}))
"""


def build(path: Path, gib: int) -> int:
    """The domain, mapped one GiB per transaction; returns its id."""
    from iommupt_store import Store
    from iommupt_store.domains import domain_alloc, get_domain

    with Store.init(path) as store:
        store.create_machine("bench", max(64, 2 * gib) * GIB)
        machine = store.machine("bench")
        with machine.transaction() as tx:
            domain_id = domain_alloc(tx, "x86_64").id
        for i in range(gib):
            with machine.transaction() as tx:
                get_domain(tx, domain_id).map_range(i * GIB, PA + i * GIB, GIB)
    return domain_id


def child(code: str, db: Path, domain_id: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", code, str(db), str(domain_id)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child failed: {proc.stderr.strip()}")
    out: dict[str, float] = json.loads(proc.stdout)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=int, default=1, help="domain size in GiB (default 1)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "bench.db"
        t0 = time.perf_counter()
        domain_id = build(db, args.gib)
        print(f"built {args.gib} GiB in 4 KiB pages in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        raw, ver = [], []
        for _ in range(args.repeat):
            r = child(RAW, db, domain_id)
            v = child(VERIFY, db, domain_id)
            if (r["frames"], r["leaves"], r["bytes"]) != (v["frames"], v["leaves"], v["bytes"]):
                raise SystemExit(f"the walks disagree: raw {r}, verify {v}")
            raw.append(r["s"])
            ver.append(v["s"])
    r_s, v_s = statistics.median(raw), statistics.median(ver)
    frames = int(r["frames"])
    print(f"raw     {r_s * 1e3:9.1f} ms  {r_s / frames * 1e6:7.1f} us/frame  (sqlite3 + array walk, {frames} frames)")
    print(f"verify  {v_s * 1e3:9.1f} ms  {v_s / frames * 1e6:7.1f} us/frame  ({int(v['leaves'])} leaf entries checked)")
    print(f"verify ratio_vs_raw={v_s / r_s:.2f}")


if __name__ == "__main__":
    main()
