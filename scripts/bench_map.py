#!/usr/bin/env python3
"""Benchmark: mapping into stored page tables, against a raw sqlite3 baseline.

Figures (median of --repeat runs, each into a fresh SQLite file):
  map_1GiB_4K      x86_64 4-level: domain_alloc + one map_range of 1 GiB in 4 KiB pages + commit
  raw_1GiB_4K      the same 515 frames built with array and written by sqlite3.executemany
  map_64GiB_2M     x86_64: 64 GiB in 2 MiB pages + commit
  map_1GiB_4K_amdv1  amdv1 (dynamic top): 1 GiB in 4 KiB pages + commit
The last line is ``map_1GiB_4K ratio_vs_raw=<float>`` (target <= 10, goal 5).

Usage: python scripts/bench_map.py [--repeat N]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path

from iommupt_store import Store
from iommupt_store.domains import domain_alloc

GIB = 1 << 30
PA_4K = 0x100001000  # 4 KiB aligned only, so every page is 4 KiB


def timed(fn: Callable[[Path], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d)
            t0 = time.perf_counter()
            fn(path)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def store_map(fmt: str, length: int, paddr: int) -> Callable[[Path], None]:
    def run(path: Path) -> None:
        store = Store.init(path / "bench.db")
        store.create_machine("bench", 256 * GIB)
        machine = store.machine("bench")
        t0 = time.perf_counter()
        with machine.transaction() as tx:
            domain_alloc(tx, fmt).map_range(0, paddr, length)
        run.elapsed = time.perf_counter() - t0  # type: ignore[attr-defined]
        store.close()

    return run


def measure_store(fmt: str, length: int, paddr: int, repeat: int) -> float:
    """Median of the map + commit part only (schema creation is not the workload)."""
    run = store_map(fmt, length, paddr)
    samples = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as d:
            run(Path(d))
            samples.append(run.elapsed)  # type: ignore[attr-defined]
    return statistics.median(samples)


def raw_baseline(path: Path) -> None:
    """The same bytes x86_64 would hold for 1 GiB of 4 KiB pages, written raw."""
    first_pfn = 0x100
    top, l2, l1 = first_pfn, first_pfn + 1, first_pfn + 2
    l0 = [first_pfn + 3 + i for i in range(512)]
    table_bits = 0x27  # P | RW | U | A
    frames: list[tuple[int, bytes]] = []
    t = array("Q", bytes(4096))
    t[0] = (l2 << 12) | table_bits
    frames.append((top, t.tobytes()))
    t = array("Q", bytes(4096))
    t[0] = (l1 << 12) | table_bits
    frames.append((l2, t.tobytes()))
    frames.append((l1, array("Q", [(p << 12) | table_bits for p in l0]).tobytes()))
    leaf_bits = 0x67  # P | RW | U | A | D
    for i, pfn in enumerate(l0):
        base = PA_4K + i * (512 << 12)
        frames.append((pfn, array("Q", range(base | leaf_bits, base + (512 << 12), 4096)).tobytes()))
    db = sqlite3.connect(path / "raw.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE page (machine_id INTEGER, pfn INTEGER, contents BLOB, PRIMARY KEY (machine_id, pfn))")
    db.execute("BEGIN IMMEDIATE")
    db.executemany("INSERT INTO page VALUES (1, ?, ?)", frames)
    db.execute("COMMIT")
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="runs per figure (median is reported)")
    args = ap.parse_args()

    raw = timed(raw_baseline, args.repeat)
    print(f"raw_1GiB_4K          {raw * 1e3:8.1f} ms  (array + sqlite3 executemany, 515 frames)")
    m4k = measure_store("x86_64", GIB, PA_4K, args.repeat)
    print(f"map_1GiB_4K          {m4k * 1e3:8.1f} ms  (x86_64, 262144 PTEs, 515 frames, committed)")
    m2m = measure_store("x86_64", 64 * GIB, 0x40200000, args.repeat)
    print(f"map_64GiB_2M         {m2m * 1e3:8.1f} ms  (x86_64, 32768 PDEs, 67 frames, committed)")
    amd = measure_store("amdv1", GIB, PA_4K, args.repeat)
    print(f"map_1GiB_4K_amdv1    {amd * 1e3:8.1f} ms  (amdv1 dynamic top, 262144 PTEs, committed)")
    print(f"map_1GiB_4K ratio_vs_raw={m4k / raw:.2f}")


if __name__ == "__main__":
    main()
