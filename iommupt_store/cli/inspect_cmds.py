"""Inspection commands that only read: query, export-image, shell.

Like every inspecting command they open the machine as an observer: they never
start a boot, free memory or write a row.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import click

from . import render
from .common import Command, Context, emit_json, json_option, pass_ctx


def _plain(value: Any) -> Any:
    """A value as JSON or CSV can carry it: bytes as hex text."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return value


@click.command("query", cls=Command)
@click.argument("sql")
@json_option
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (a header line, then one line per row) on stdout.")
@pass_ctx
def query(ctx: Context, sql: str, as_json: bool, as_csv: bool) -> None:
    """Run one read-only SQL statement and print its rows.

    On SQLite four helper functions are there that the stock shell lacks:
    le64(blob, index) gives the 64-bit entry at an index of a frame,
    pte_decode(format, level, entry) says what an entry means (JSON),
    hex64(value) prints a u64 kept in two's complement as 0x...,
    sha256(blob) hashes like preservation.content_hash. See docs/sql.md.

    \b
    Examples:
      iommupt-store query "SELECT domain_id, page_size, sum(size / page_size) FROM mapping GROUP BY 1, 2"
      iommupt-store query --json "SELECT * FROM preserved_frame WHERE boot = 1"
      iommupt-store query "SELECT hex64(le64(contents, 0)) FROM page WHERE pfn = 256"
    """
    from ..query import run_query

    if as_json and as_csv:
        raise click.UsageError("--json and --csv exclude each other")
    res = run_query(ctx.observer(), sql)
    if as_json:
        emit_json([{c: _plain(v) for c, v in zip(res.columns, row, strict=True)} for row in res.rows])
    elif as_csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(res.columns)
        w.writerows([_plain(v) for v in row] for row in res.rows)
    elif len(res.columns) == 1 and len(res.rows) == 1:
        render.result(_plain(res.rows[0][0]))  # a scalar answer prints as itself, for shell scripts
    else:
        render.table(res.columns, ([_plain(v) for v in row] for row in res.rows))
        render.note(f"{len(res.rows)} row(s)")


@click.command("export-image", cls=Command)
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@pass_ctx
def export_image(ctx: Context, image: Path, as_json: bool) -> None:
    """Write the machine's memory as a sparse raw image IMAGE, and IMAGE.json.

    Every allocated page lands at its physical address (the file is as long
    as the machine's memory; holes stay sparse). IMAGE.json names each
    domain's format, top table address, levels, VA size and features, so a
    memory-forensics tool can walk the tables (volatility3's Intel32e layer
    reads an x86_64 domain directly).

    \b
    Example:
      iommupt-store export-image mem.raw && jq .domains mem.raw.json
    """
    from ..export import export_image as export

    with render.progress_bar("exporting pages") as advance:
        sidecar = export(ctx.observer(), image, progress=advance)
    if as_json:
        emit_json(sidecar)
    else:
        render.result(
            f"{image}: {sidecar.pages_written} page(s), {sidecar.bytes_written} bytes at their physical "
            f"addresses; {len(sidecar.domains)} domain(s) described in {image}.json"
        )


@click.command("shell", cls=Command)
@click.option("-c", "command", metavar="CODE", help="Run CODE (Python) instead of an interactive console.")
@pass_ctx
def shell(ctx: Context, command: str | None) -> None:
    """Python with the store open read-only and the API imported.

    For questions SQL does not answer: tx is a read-only transaction,
    hardware_walker(tx, ID).translate(IOVA) walks a domain, stored_runs(tx, ID)
    lists its mappings, sql("SELECT ...") runs a query. Nothing is written.

    \b
    Example:
      iommupt-store shell -c "print(hardware_walker(tx, 1).translate(0x1234))"
    """
    from ..shell import run_shell

    run_shell(ctx.observer(), command)


COMMANDS = [query, export_image, shell]
