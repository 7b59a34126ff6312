#!/usr/bin/env python3
"""Benchmark: the whole live-update cycle of one x86_64 domain in 4 KiB pages, at several sizes.

For each size (GiB), on a fresh database, three processes in turn:
  phase 1  map the whole size in 4 KiB pages (one call), preserve the domain, seal (liveupdate)
  raw      the raw baseline: read every frame of the preserved domain with the database driver
           (sqlite3 or psycopg) and walk them from the top, decoding every entry with array and
           the x86_64 bit masks
  phase 2  a new boot: restore the domain, verify every translation (verify_domain, against
           the runs phase 1 mapped), free it
Each process times its own work (after its imports) and reports its peak RSS (getrusage).
Time per frame is a phase's time over the domain's table frames (515 per GiB).

Prints a table, then one line per size:
  scale_<N>GiB_4K phase1_us_per_frame=<f> phase2_us_per_frame=<f> peak_rss_mib=<i> verify_ratio_vs_raw=<f>
(peak_rss_mib: the larger of the two phases; verify_ratio_vs_raw: verify's time in phase 2 over
the raw walk's), and last exactly:
  scale_max per_frame_ratio_vs_1GiB=<float> peak_rss_mib=<int>
(the worse of the two phases' per-frame ratios at the largest size against the smallest size run,
normally 1 GiB; and the largest peak RSS of any phase process).

Usage: python scripts/bench_scale.py [--sizes 1,4,16,64] [--url postgresql+psycopg://user@host/db]
With --url, each size runs in a new database created next to the one named (and dropped after).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

GIB = 1 << 30
PA = 0x100001000  # only 4 KiB aligned: every page is 4 KiB
TOKEN = 0x5CA1E

_RSS = "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024"  # Linux: KiB

PHASE1 = f"""
import json, resource, sys, time
t0 = time.perf_counter()
from iommupt_store import Store
from iommupt_store.domains import domain_alloc, frame_counts
from iommupt_store.liveupdate import liveupdate, preserve_domain
imports = time.perf_counter() - t0
url, size = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
with Store(url) as store:
    store.create_machine("bench", max(64 << 30, 2 * size))
    machine = store.machine("bench")
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0, {PA}, size)
        domain_id = dom.id
    mapped = time.perf_counter() - t0
    with machine.transaction() as tx:
        frames = frame_counts(tx)[domain_id]
        preserve_domain(tx, domain_id, {TOKEN})
    liveupdate(machine)
took = time.perf_counter() - t0
print(json.dumps({{"s": took, "map_s": mapped, "imports_s": imports, "frames": frames, "domain_id": domain_id,
                  "rss_mib": {_RSS}}}))
"""

PHASE2 = f"""
import json, resource, sys, time
t0 = time.perf_counter()
from iommupt_store import Store
from iommupt_store.domains import frame_counts, get_domain
from iommupt_store.liveupdate import restore_domain
from iommupt_store.verify import ExpectedRun, verify_domain
imports = time.perf_counter() - t0
url, size = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
with Store(url) as store:
    machine = store.machine("bench")
    with machine.transaction() as tx:
        domain_id = restore_domain(tx, {TOKEN}).id
    t1 = time.perf_counter()
    with machine.transaction(write=False) as tx:
        report = verify_domain(tx, domain_id, [ExpectedRun(iova=0, phys={PA}, length=size, prot="rw")])
    verify_s = time.perf_counter() - t1
    if not report.ok or report.summary.translations != size >> 12:
        sys.exit(f"verify: {{report.summary}} {{report.differences}}")
    with machine.transaction() as tx:
        get_domain(tx, domain_id).free()
        if sum(frame_counts(tx).values()):
            sys.exit("frames left after free")
took = time.perf_counter() - t0
print(json.dumps({{"s": took, "verify_s": verify_s, "imports_s": imports, "frames": report.summary.frames_read,
                  "rss_mib": {_RSS}}}))
"""

RAW = f"""
import json, resource, sys, time
from array import array
url, domain_id = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
if "://" in url:
    import psycopg
    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
    q = lambda sql, *a: conn.execute(sql.replace("?", "%s"), a)
else:
    import sqlite3
    conn = sqlite3.connect(url)
    q = lambda sql, *a: conn.execute(sql, a)
top_phys, top_level = q("SELECT top_phys, top_level FROM domain WHERE id = ?", domain_id).fetchone()
frames = dict(q("SELECT pfn, contents FROM page WHERE domain_id = ?", domain_id))
P, PS, ADDR = 1, 1 << 7, ((1 << 52) - 1) & ~0xFFF
leaves = 0

def walk(phys, level):
    global leaves
    for raw in array("Q", frames[phys >> 12]):
        if not raw & P:
            continue
        addr = raw & ADDR
        if level == 0 or raw & PS:
            leaves += 1
        else:
            walk(addr, level - 1)

walk(top_phys, top_level)
took = time.perf_counter() - t0
print(json.dumps({{"s": took, "frames": len(frames), "leaves": leaves, "rss_mib": {_RSS}}}))
"""


def run(code: str, *args: object) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"a benchmark process failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    out: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@contextlib.contextmanager
def fresh_database(url: str | None, workdir: Path, size_gib: int) -> Iterator[str]:
    """A new, empty store: an SQLite file in ``workdir``, or a new PostgreSQL database beside ``url``'s."""
    from iommupt_store import Store

    if url is None:
        path = workdir / f"scale-{size_gib}.db"
        Store.init(path).close()
        try:
            yield str(path)
        finally:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{path}{suffix}")
        return
    import psycopg

    admin = url.replace("postgresql+psycopg://", "postgresql://")
    name = f"iommupt_scale_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    fresh = f"{url.rpartition('/')[0]}/{name}"
    try:
        Store.init(fresh).close()
        yield fresh
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def measure(url: str | None, workdir: Path, size_gib: int) -> dict[str, float]:
    size = size_gib * GIB
    with fresh_database(url, workdir, size_gib) as db:
        p1 = run(PHASE1, db, size)
        raw = run(RAW, db, int(p1["domain_id"]))
        p2 = run(PHASE2, db, size)
    frames = p1["frames"]
    if raw["frames"] != frames or p2["frames"] != frames or raw["leaves"] != size >> 12:
        raise SystemExit(f"the processes disagree on the domain: phase 1 {p1}, raw {raw}, phase 2 {p2}")
    return {
        "gib": size_gib,
        "frames": frames,
        "p1_s": p1["s"],
        "p1_us": p1["s"] / frames * 1e6,
        "p1_rss": p1["rss_mib"],
        "p2_s": p2["s"],
        "p2_us": p2["s"] / frames * 1e6,
        "p2_rss": p2["rss_mib"],
        "verify_s": p2["verify_s"],
        "raw_s": raw["s"],
        "raw_rss": raw["rss_mib"],
        "ratio": p2["verify_s"] / raw["s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16,64", help="domain sizes in GiB, comma-separated (default 1,4,16,64)")
    ap.add_argument("--url", help="run on PostgreSQL: an SQLAlchemy URL of a server database (postgresql+psycopg://)")
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes {args.sizes!r}: give whole GiB numbers such as 1,4,16")
    if not sizes or min(sizes) < 1:
        ap.error("--sizes needs at least one size of 1 GiB or more")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for gib in sizes:
            rows.append(measure(args.url, Path(d), gib))
            r = rows[-1]
            print(
                f"{gib} GiB: phase 1 {r['p1_s']:.1f} s, phase 2 {r['p2_s']:.1f} s, verify {r['verify_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    header = (
        f"{'size':>8} {'frames':>8} | {'phase1 s':>9} {'us/frame':>9} {'RSS MiB':>8} | "
        f"{'phase2 s':>9} {'us/frame':>9} {'RSS MiB':>8} | {'verify s':>9} {'raw s':>7} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['gib']:>5}GiB {r['frames']:>8} | {r['p1_s']:>9.2f} {r['p1_us']:>9.1f} {r['p1_rss']:>8} | "
            f"{r['p2_s']:>9.2f} {r['p2_us']:>9.1f} {r['p2_rss']:>8} | {r['verify_s']:>9.2f} {r['raw_s']:>7.2f} "
            f"{r['ratio']:>6.2f}"
        )
    for r in rows:
        print(
            f"scale_{r['gib']}GiB_4K phase1_us_per_frame={r['p1_us']:.1f} phase2_us_per_frame={r['p2_us']:.1f} "
            f"peak_rss_mib={max(r['p1_rss'], r['p2_rss'])} verify_ratio_vs_raw={r['ratio']:.2f}"
        )
    base, top = min(rows, key=lambda r: r["gib"]), max(rows, key=lambda r: r["gib"])
    worse = max(top["p1_us"] / base["p1_us"], top["p2_us"] / base["p2_us"])
    peak = max(max(r["p1_rss"], r["p2_rss"]) for r in rows)
    print(f"scale_max per_frame_ratio_vs_1GiB={worse:.2f} peak_rss_mib={int(peak)}")


if __name__ == "__main__":
    main()
