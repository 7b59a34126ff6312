"""Live-update commands: preserve, unpreserve, liveupdate, reboot, restore, handover."""

from __future__ import annotations

import json
import sys

import click

from ..liveupdate import handover_report, liveupdate, preserve_domain, restore_domain, unpreserve_domain
from ..liveupdate.handover_abi import PreflightRefused
from ..liveupdate.sessions import preserve_domain_in_session
from ..names import check_machine_name
from . import render
from .abi_cmds import PROFILE, show_report
from .common import ID, INT, Command, Context, emit_json, json_option, pass_ctx


@click.command(cls=Command)
@click.argument("domain_id", type=ID)
@click.option("--token", type=INT, required=True, help="The u64 the next boot will restore it by.")
@click.option("--session", "session_name", help="Hold it in this LUO session (see 'session create').")
@json_option
@pass_ctx
def preserve(ctx: Context, domain_id: int, token: int, session_name: str | None, as_json: bool) -> None:
    """Preserve DOMAIN_ID's page tables for a live update, under TOKEN.

    Every table reachable from the top is recorded as handed over, and the
    descriptor (top_table_phys, top_level, vasz, sign_extend) goes into this
    boot's handover. The domain refuses map/unmap from now on.

    \b
    Example:
      iommupt-store preserve 1 --token 0x100 --json
    """
    with render.progress(f"preserving domain {domain_id}"), ctx.machine().transaction() as tx:
        if session_name is None:
            desc = preserve_domain(tx, domain_id, token)
        else:
            desc = preserve_domain_in_session(tx, session_name, domain_id, token)
    if as_json:
        emit_json({"domain": domain_id, "token": f"{token:#x}", "descriptor": desc.model_dump(mode="json")})
    else:
        render.result(f"domain {domain_id} preserved under token {token:#x}: {_describe(desc.model_dump(mode='json'))}")


@click.command(cls=Command)
@click.option("--token", type=INT, required=True, help="The token the domain was preserved under.")
@json_option
@pass_ctx
def unpreserve(ctx: Context, token: int, as_json: bool) -> None:
    """Undo a preserve (before the live update): the domain is mutable again."""
    with ctx.machine().transaction() as tx:
        domain_id = unpreserve_domain(tx, token)
    if as_json:
        emit_json({"domain": domain_id, "token": f"{token:#x}"})
    else:
        render.result(f"domain {domain_id} unpreserved (token {token:#x})")


@click.command("liveupdate", cls=Command)
@click.option(
    "--next",
    "next_profile",
    type=PROFILE,
    metavar="PROFILE",
    help="Seal only if a kernel of this profile could read what is preserved (pre-flight).",
)
@json_option
@pass_ctx
def liveupdate_cmd(ctx: Context, next_profile: str | None, as_json: bool) -> None:
    """Seal this boot's handover and end the boot: the kexec.

    Every preserved domain is checked first (frames reachable from the top ==
    frames preserved; bytes unchanged); if one fails nothing changes. The next
    command that opens the machine starts the next boot, where only what was
    preserved survives. The handover records the kernel profile that wrote it
    and its kexec-metadata (previous release, kexec count).

    With --next PROFILE the seal first checks what is preserved against that
    kernel (as 'compat' does for two profiles): when the next kernel could not
    read it (a cold boot or a panic), nothing is sealed, the report says which
    objects, which ABI and what would happen, and the exit code is 1.

    
    Examples:
      iommupt-store liveupdate
      iommupt-store liveupdate --next lu-v5 --json
    """
    try:
        with render.progress("checking and sealing the handover"):
            report = liveupdate(ctx.machine(), next_profile)
    except PreflightRefused as e:
        if as_json:
            emit_json(e.report)
        else:
            show_report(e.report)
        render.error(e)
        sys.exit(e.exit_code)
    if as_json:
        emit_json(report)
        return
    if report.next is not None:
        show_report(report.next)
    render.result(
        f"boot {report.boot} sealed by kernel profile {report.kernel_profile}"
        + (f" (kexec count {report.kexec_count})" if report.kexec_count is not None else "")
        + ": "
        f"{report.domains} domain(s), {report.frames} frame(s) handed over; the next process starts a new boot"
    )


@click.command(cls=Command)
@click.option("--cold", is_flag=True, required=True, help="A cold reboot: nothing is handed over.")
@json_option
@pass_ctx
def reboot(ctx: Context, cold: bool, as_json: bool) -> None:
    """End this boot without a handover: all memory is freed."""
    machine = ctx.machine()
    number = machine.boot_number
    machine.reboot(cold=cold)
    if as_json:
        emit_json({"boot": number, "end": "cold"})
    else:
        render.result(f"boot {number} ended (cold reboot); the next process starts boot {number + 1}")


@click.command(cls=Command)
@click.option("--token", type=INT, required=True, help="The token the previous boot preserved the domain under.")
@json_option
@pass_ctx
def restore(ctx: Context, token: int, as_json: bool) -> None:
    """Restore a domain the previous boot preserved: it comes back immutable (free only)."""
    with render.progress(f"restoring token {token:#x}"), ctx.machine().transaction() as tx:
        dom = restore_domain(tx, token)
        info = dom.info()
    if as_json:
        emit_json(info)
    else:
        render.note(f"token {token:#x} restored as domain {info.id} ({info.format}, {info.frames} frame(s))")
        render.result(info.id)


def _describe(desc: dict[str, object]) -> str:
    """A one-line view of a descriptor (the whole one is in --json)."""
    try:
        return (
            f"{desc['format']} top {desc['top_table_phys']} L{desc['top_level']} vasz {desc['vasz']}"
            + (" sign-extended" if desc.get("sign_extend") else "")
            + f" ({desc['compatible']} v{desc['version']})"
        )
    except (KeyError, TypeError):
        return json.dumps(desc, default=str)


@click.command(cls=Command)
@json_option
@pass_ctx
def handover(ctx: Context, as_json: bool) -> None:
    """The incoming handover (from the previous boot) and the outgoing one (this boot)."""
    with ctx.observer().transaction(write=False) as tx:
        report = handover_report(tx)
    if as_json:
        emit_json(report)
        return
    for title, entries in (("incoming (previous boot)", report.incoming), ("outgoing (this boot)", report.outgoing)):
        render.table(
            ("token", "state", "domain", "restored as", "frames", "unclaimed", "descriptor"),
            (
                (
                    f"{e.token:#x}",
                    e.state,
                    e.domain,
                    e.restored_domain,
                    e.frames,
                    e.unclaimed_frames,
                    _describe(e.descriptor),
                )
                for e in entries
            ),
            title=f"boot {report.boot}: {title}",
        )
    render.result(f"boot {report.boot} runs kernel profile {report.kernel_profile}")
    rec = report.incoming_records
    if rec is not None:
        kexec = rec.get("kexec") or {}
        render.result(
            f"incoming handover: KHO {rec.get('compatible')}, written by {rec.get('writer_profile') or 'unknown'}"
            + (f", exec from {kexec.get('previous_release')} (count {kexec.get('kexec_count')})" if kexec else "")
        )
    if report.discarded:
        render.result(f"incoming handover discarded (booted as if cold): {report.discarded}")
    if report.leaked_frames:
        render.result(
            f"{report.leaked_frames} preserved frame(s) not re-claimed in this boot: "
            "they stay reserved until the next boot"
        )


COMMANDS = [preserve, unpreserve, liveupdate_cmd, reboot, restore, handover]


@click.command(cls=Command)
@click.option("--machine-name", default="demo", show_default=True, help="Machine the demo (re)creates and uses.")
@json_option
@pass_ctx
def demo(ctx: Context, machine_name: str, as_json: bool) -> None:
    """Run a whole live update across two real processes and check it.

    \b
    Process A builds a domain of every format (x86_64 4- and 5-level, amdv1
    with a grown dynamic top, vtdss DMA-incoherent, riscv Sv39+Svnapot and
    Sv48), maps a mix of page sizes, preserves them all and seals the boot.
    Each domain has a device attached, and domains and devices are preserved
    in one LUO session. Process B starts the next boot, checks that every
    device still translates exactly as before through the preserved tables
    (DMA never stopped), retrieves the session, restores each domain (which
    re-attaches its device with its preserved domain id), checks again, moves
    each device to a new domain (the restored one is freed), finishes the
    session and checks that no frame is left.

    \b
    The database is ./iommupt.db unless --db says otherwise; the machine
    MACHINE_NAME in it is reset first.
    Example:
      iommupt-store demo
      iommupt-store --db /tmp/lu.db demo --json
    """
    from ..demo import run_demo

    check_machine_name(machine_name)
    with render.progress("running the live-update demo (two processes)…"):
        summary, phases = run_demo(ctx.db, machine_name)
    if as_json:
        emit_json({"summary": summary.model_dump(mode="json"), "phases": [p.model_dump(mode="json") for p in phases]})
    else:
        render.table(
            ("phase", "boot", "domains", "frames", "translations checked", "seconds"),
            ((p.phase, p.boot, p.domains, p.frames, p.translations_checked, f"{p.seconds:.3f}") for p in phases),
            title=f"live update on machine {summary.machine!r} ({summary.db})",
        )
        render.result(
            f"formats: {', '.join(summary.formats)}\n"
            f"frames preserved {summary.frames_preserved}, re-claimed {summary.frames_reclaimed}, "
            f"leaked {summary.frames_leaked}, left after free {summary.frames_left_after_free}; "
            f"{summary.translations_checked} translations checked; total {summary.seconds['total']:.2f} s\n"
            f"session {summary.session!r}: {summary.devices_preserved} device(s) preserved, "
            f"{summary.devices_reattached} re-attached to their restored domains, then replaced and finished\n"
            + ("OK: every translation survived the live update" if summary.ok else "FAILED")
        )
    if not summary.ok:
        raise SystemExit(1)


COMMANDS.append(demo)
