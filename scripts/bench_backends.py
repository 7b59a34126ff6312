#!/usr/bin/env python3
"""Benchmark: phase 1 of a live update (map, preserve, seal) on SQLite and on PostgreSQL.

Each size is an x86_64 domain mapped in 4 KiB pages in one transaction, then
preserved and sealed; every run gets a fresh SQLite file and, with --url, a
fresh PostgreSQL database on that server (created and dropped here). The
backends take turns, run by run. Prints the median of --repeat runs per
backend and size and, per size,
``phase1_<N>GiB_4K pg_ratio_vs_sqlite=<f>``.

Usage: python scripts/bench_backends.py [--sizes 1,4] [--repeat N] [--url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from iommupt_store import Store
from iommupt_store.domains import domain_alloc
from iommupt_store.liveupdate import liveupdate, preserve_domain

GIB = 1 << 30
PA = 0x100001000  # only 4 KiB aligned: every page is 4 KiB


@contextlib.contextmanager
def sqlite_db() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        yield str(Path(d) / "bench.db")


@contextlib.contextmanager
def postgres_db(url: str) -> Iterator[str]:
    import psycopg

    admin = url.replace("postgresql+psycopg://", "postgresql://")
    name = f"iommupt_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{url.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def phase1(location: str, gib: int) -> tuple[float, float]:
    """(map seconds, preserve + seal seconds)."""
    store = Store.init(location)
    try:
        store.create_machine("bench", max(64, 4 * gib) * GIB)
        machine = store.machine("bench")
        t0 = time.perf_counter()
        with machine.transaction() as tx:
            dom = domain_alloc(tx, "x86_64")
            dom.map_range(0, PA, gib * GIB)
        t1 = time.perf_counter()
        with machine.transaction() as tx:
            preserve_domain(tx, dom.id, 0x51)
        liveupdate(machine)
        return t1 - t0, time.perf_counter() - t1
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="domain sizes in GiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--url", help="a PostgreSQL server URL (the user may create databases)")
    args = ap.parse_args()
    backends: dict[str, Callable[[], contextlib.AbstractContextManager[str]]] = {"sqlite": sqlite_db}
    if args.url:
        backends["postgresql"] = lambda: postgres_db(args.url)
    for gib in (int(s) for s in args.sizes.split(",")):
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
        # the backends take turns, run by run: on a shared machine a burst of load hits both alike
        for _ in range(args.repeat):
            for name, make in backends.items():
                with make() as location:
                    runs[name].append(phase1(location, gib))
        total: dict[str, float] = {}
        for name, rs in runs.items():
            m, p = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
            total[name] = m + p
            print(f"{name:<10} {gib:>3} GiB  map {m * 1e3:8.1f} ms  preserve+seal {p * 1e3:8.1f} ms")
        if "postgresql" in total:
            print(f"phase1_{gib}GiB_4K pg_ratio_vs_sqlite={total['postgresql'] / total['sqlite']:.2f}")


if __name__ == "__main__":
    main()
