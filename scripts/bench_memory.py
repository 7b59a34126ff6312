#!/usr/bin/env python3
"""Benchmark: time per frame and peak memory of the live-update cycle at growing domain sizes.

An x86_64 domain is mapped in 4 KiB pages; each phase runs in its own process:
  phase1  create the domain, map SIZE GiB (one call, or --chunked: one 1 GiB transaction
          each), preserve it, seal the live update
  phase2  a new process (the next kernel): restore the domain, check every translation
          (level-0 tables read in batches), free it
For each size it prints the frames, each phase's microseconds per frame and peak RSS (MiB,
``ru_maxrss`` inside the child), then one line per size:
  mem_<N>GiB_4K phase1_us_per_frame=<f> phase2_us_per_frame=<f> peak_rss_mib=<i>
With --chunked it also maps in one call and prints ``chunked_ratio=<f>`` (chunked / one call).

Usage: python scripts/bench_memory.py [--sizes 1,4,16] [--chunked] [--url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

GIB = 1 << 30
PA = 0x100001000  # only 4 KiB aligned: every page is 4 KiB
TOKEN = 0x51

PHASE1 = """
import json, resource, sys, time
from iommupt_store import Store
from iommupt_store.domains import domain_alloc
from iommupt_store.liveupdate import liveupdate, preserve_domain
url, size, chunked, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
GIB, PA = 1 << 30, {pa}
store = Store.init(url)
store.create_machine("bench", 1 << 41)
machine = store.machine("bench")
t0 = time.perf_counter()
with machine.transaction() as tx:
    dom = domain_alloc(tx, "x86_64")
    if not chunked:
        dom.map_range(0, PA, size * GIB)
for i in range(size if chunked else 0):
    with machine.transaction() as tx:
        from iommupt_store.domains import get_domain
        get_domain(tx, dom.id).map_range(i * GIB, PA + i * GIB, GIB)
t_map = time.perf_counter() - t0
if mode == "full":
    with machine.transaction() as tx:
        preserve_domain(tx, dom.id, {token})
    report = liveupdate(machine)
    frames = report.frames
else:
    frames = size * 515
elapsed = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
print(json.dumps({{"s": elapsed, "map_s": t_map, "frames": frames, "rss": rss}}))
"""

PHASE2 = """
import json, resource, sys, time
from array import array
from iommupt_store import Store
from iommupt_store.domains import frame_counts
from iommupt_store.formats.base import EntryType, item_lg2sz
from iommupt_store.liveupdate import restore_domain
url, size = sys.argv[1], int(sys.argv[2])
PA = {pa}
t0 = time.perf_counter()
machine = Store(url).machine("bench")
with machine.transaction() as tx:
    dom_id = restore_domain(tx, {token}).id
checked = 0
with machine.transaction(write=False) as tx:
    from iommupt_store.domains import get_domain
    pt = get_domain(tx, dom_id).pt
    fmt, mem = pt.fmt, tx.memory
    # upper levels first (few frames), then the level-0 tables in batches
    leaves = []
    todo = [(pt.top_phys >> 12, pt.top_level, 0)]
    while todo:
        pfn, level, base = todo.pop()
        for i, raw in enumerate(mem.words(pfn)):
            if raw:
                d = fmt.decode(raw, level, pt.features)
                va = base + (i << item_lg2sz(level))
                if d.type is EntryType.TABLE:
                    (leaves if level == 1 else todo).append((d.addr >> 12, level - 1, va))
    leaves.sort()
    for k in range(0, len(leaves), 256):
        batch = leaves[k : k + 256]
        mem.load([p for p, _, _ in batch])
        for pfn, _, va in batch:
            words = mem.words(pfn)
            first = fmt.decode(words[0], 0, pt.features)
            if first.addr != PA + va or words != array("Q", range(words[0], words[0] + (512 << 12), 4096)):
                sys.exit(f"bad translations in table {{pfn:#x}}")
            checked += 512
if checked != size * 262144:
    sys.exit(f"{{checked}} translations, expected {{size * 262144}}")
with machine.transaction() as tx:
    get_domain(tx, dom_id).free()
    if sum(frame_counts(tx).values()):
        sys.exit("frames left after free")
elapsed = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
print(json.dumps({{"s": elapsed, "rss": rss}}))
"""


def child(code: str, *args: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"benchmark process failed: {proc.stderr.strip()}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@contextmanager
def fresh_url(d: Path, server: str | None) -> Iterator[str]:
    """A new SQLite file, or a new database on the PostgreSQL server (dropped afterwards)."""
    if server is None:
        yield str(d / "bench.db")
        return
    from sqlalchemy import create_engine, make_url

    name = f"iommupt_bench_memory_{os.getpid()}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16", help="domain sizes in GiB, comma-separated")
    ap.add_argument("--chunked", action="store_true", help="also map in 1 GiB transactions and compare")
    ap.add_argument("--url", help="a PostgreSQL server URL: each run makes its own database there (default: SQLite)")
    args = ap.parse_args()
    p1, p2 = PHASE1.format(pa=PA, token=TOKEN), PHASE2.format(pa=PA, token=TOKEN)
    print(f"{'size':>6} {'frames':>8} {'phase1 us/frame':>16} {'rss MiB':>8} {'phase2 us/frame':>16} {'rss MiB':>8}")
    for size in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as d, fresh_url(Path(d), args.url) as url:
            one = child(p1, url, str(size), "0", "full")
            two = child(p2, url, str(size))
        frames = one["frames"]
        us1, us2 = one["s"] / frames * 1e6, two["s"] / frames * 1e6
        print(f"{size:>4}G {frames:>8} {us1:>16.1f} {one['rss']:>8} {us2:>16.1f} {two['rss']:>8}")
        print(
            f"mem_{size}GiB_4K phase1_us_per_frame={us1:.1f} phase2_us_per_frame={us2:.1f} "
            f"peak_rss_mib={max(one['rss'], two['rss'])}"
        )
        if args.chunked:
            with tempfile.TemporaryDirectory() as d, fresh_url(Path(d), args.url) as url:
                whole = child(p1, url, str(size), "0", "map")
            with tempfile.TemporaryDirectory() as d, fresh_url(Path(d), args.url) as url:
                parts = child(p1, url, str(size), "1", "map")
            print(
                f"map_{size}GiB one_call_s={whole['map_s']:.2f} chunked_s={parts['map_s']:.2f} "
                f"rss_mib={whole['rss']}/{parts['rss']} chunked_ratio={parts['map_s'] / whole['map_s']:.2f}"
            )


if __name__ == "__main__":
    main()
