"""``verify``: check every translation of a domain (read-only)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import render
from .common import ID, Command, Context, emit_json, json_option, pass_ctx


@click.command("verify", cls=Command)
@click.argument("domain_id", type=ID)
@click.option(
    "--expect",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    metavar="FILE",
    help="JSON list of the runs the domain should translate ('-' reads stdin); "
    "default: the mapping runs recorded for the domain.",
)
@click.option(
    "--max-differences",
    type=ID,
    metavar="N",
    help="List at most N differing runs (default 20; all of them are counted).",
)
@json_option
@pass_ctx
def verify(ctx: Context, domain_id: int, expect: Path | None, max_differences: int | None, as_json: bool) -> None:
    """Check every translation of DOMAIN_ID, walking its frames as the IOMMU would.

    Compares what the frames translate (each IOVA's physical address and
    read/write rights) with the mapping runs recorded for the domain, or with
    the runs in FILE. Differences come as runs: missing (expected, not
    translated), unexpected (translated, not expected), wrong_phys and
    wrong_permissions. Exit code 0 when every translation matches, 1 otherwise.

    \b
    FILE holds a JSON list of runs in ascending IOVA order; numbers are
    integers or strings such as "0x1000" or "2M"; prot (default "rw") is
    what the range was mapped with, compared as the domain's format encodes it;
    upper-half IOVAs are sign-extended, as the hardware sees them:
      [{"iova": "0x0", "phys": "0x100000000", "length": "2M", "prot": "rw"},
       {"iova": "0x200000", "phys": "0x80000000", "length": "4K", "prot": "r"}]

    \b
    Examples:
      iommupt-store verify 1
      iommupt-store verify 1 --expect runs.json --json
    """
    from ..errors import IommuptError
    from ..units import format_size
    from ..verify import DEFAULT_MAX_DIFFERENCES, parse_expectation, verify_domain

    runs = None
    if expect is not None:
        try:
            text = sys.stdin.buffer.read() if str(expect) == "-" else expect.read_bytes()
        except OSError as e:
            raise click.BadParameter(f"cannot read {str(expect)!r}: {e.strerror}", param_hint="--expect") from None
        try:
            runs = parse_expectation(text)
        except IommuptError as e:
            raise click.BadParameter(str(e).split(": ", 1)[-1], param_hint="--expect") from None
    cap = DEFAULT_MAX_DIFFERENCES if max_differences is None else max_differences
    with render.progress_bar(f"verifying domain {domain_id}") as advance, ctx.observer().transaction(write=False) as tx:
        report = verify_domain(tx, domain_id, runs, max_differences=cap, progress=advance)
    if as_json:
        emit_json(report)
    else:
        if report.differences:
            render.table(
                ["difference", "iova", "length", "expected", "found"],
                (
                    (
                        d.kind,
                        f"{d.iova:#x}",
                        format_size(d.length),
                        "-" if d.expected_phys is None else f"{d.expected_phys:#x} {d.expected_prot}",
                        "-" if d.found_phys is None else f"{d.found_phys:#x} {d.found_prot}",
                    )
                    for d in report.differences
                ),
            )
        s = report.summary
        verdict = "every translation matches"
        if not report.ok:
            verdict = f"{report.differences_total} differing run(s)"
            if report.differences_total > len(report.differences):
                verdict += f", the first {len(report.differences)} listed"
        render.result(
            f"domain {domain_id} ({report.format}): {s.translations} translation(s) "
            f"({format_size(s.bytes_mapped)} in {s.runs_found} run(s), {s.leaf_entries} leaf entries, "
            f"{s.frames_read} frames) checked against {report.against}: {verdict}"
        )
    if not report.ok:
        raise SystemExit(1)


COMMANDS = [verify]
