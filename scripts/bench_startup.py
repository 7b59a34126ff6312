#!/usr/bin/env python3
"""Benchmark: start-up of the command line, next to ``python -c pass``.

Each figure is the median wall time of --repeat fresh processes; the commands
run round-robin so that a busy machine slows them all alike.
  python_pass      python -c pass
  help             iommupt-store --help
  version          iommupt-store --version
  status           iommupt-store status (an SQLite store with one machine, named by
                   $IOMMUPT_DB as a bare path: read through sqlite3, without SQLAlchemy)
The last lines are ``startup_help ratio_vs_python=<f>``, ``startup_version
ratio_vs_python=<f>`` and ``startup_status ratio_vs_python=<f>`` (targets:
10, 10 and 20).

Usage: python scripts/bench_startup.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command() -> list[str]:
    """The installed ``iommupt-store`` script beside this interpreter, else ``python -m iommupt_store``."""
    script = Path(sys.executable).with_name("iommupt-store")
    if script.is_file():
        return [str(script)]
    found = shutil.which("iommupt-store")
    return [found] if found else [sys.executable, "-m", "iommupt_store"]


def run(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=15, help="processes per figure (median is reported)")
    args = ap.parse_args()
    cli = command()
    with tempfile.TemporaryDirectory() as d:
        db = str(Path(d) / "bench.db")
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOMMUPT_")}
        env["IOMMUPT_DB"] = db
        subprocess.run([*cli, "init", "--mem", "1G"], check=True, capture_output=True, env=env)
        cases = {
            "python_pass": [sys.executable, "-c", "pass"],
            "help": [*cli, "--help"],
            "version": [*cli, "--version"],
            "status": [*cli, "status"],
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for argv in cases.values():
            run(argv, env)  # warm the file cache
        for _ in range(args.repeat):
            for name, argv in cases.items():
                times[name].append(run(argv, env))
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["python_pass"]
    for name, t in med.items():
        print(f"{name:<12} {t * 1e3:8.1f} ms  {t / base:6.1f}x python -c pass")
    for name in ("help", "version", "status"):
        print(f"startup_{name} ratio_vs_python={med[name] / base:.2f}")


if __name__ == "__main__":
    main()
