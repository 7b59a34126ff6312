"""Sessions and devices: sessions, session create|close|retrieve|finish, device attach|preserve|replace."""

from __future__ import annotations

import click

from ..devices import attach, detach, dma_walker, list_devices, parse_bdf, replace
from ..liveupdate.sessions import (
    close_session,
    create_session,
    finish_session,
    list_sessions,
    preserve_device,
    retrieve_session,
)
from . import render
from .common import ID, INT, Command, Context, Group, emit_json, json_option, pass_ctx


@click.command(cls=Command)
@json_option
@pass_ctx
def sessions(ctx: Context, as_json: bool) -> None:
    """Live-update sessions of the machine, with their state in each boot."""
    with ctx.observer().transaction(write=False) as tx:
        infos = list_sessions(tx)
    if as_json:
        emit_json([i.model_dump(mode="json") for i in infos])
        return
    render.table(
        ("name", "created in boot", "state", "objects", "retrieved in boot"),
        ((i.name, i.boot, i.state, i.objects, i.retrieved_in_boot) for i in infos),
    )


@click.group(cls=Group)
def session() -> None:
    """LUO sessions: named containers of preserved domains and devices.

    \b
    Boot N:   session create NAME; preserve DOMAIN --token T --session NAME;
              device preserve BDF --session NAME --token T; liveupdate
    Boot N+1: session retrieve NAME; restore --token T; device replace ...;
              session finish NAME
    """


@session.command("create")
@click.argument("name")
@json_option
@pass_ctx
def session_create(ctx: Context, name: str, as_json: bool) -> None:
    """Create an outgoing session NAME (at most 63 bytes) in this boot."""
    with ctx.machine().transaction() as tx:
        create_session(tx, name)
    if as_json:
        emit_json({"session": name, "state": "open"})
    else:
        render.result(f"session {name!r} created")


@session.command("close")
@click.argument("name")
@json_option
@pass_ctx
def session_close(ctx: Context, name: str, as_json: bool) -> None:
    """Close an outgoing session before the live update: everything in it is unpreserved."""
    with ctx.machine().transaction() as tx:
        n = close_session(tx, name)
    if as_json:
        emit_json({"session": name, "unpreserved": n})
    else:
        render.result(f"session {name!r} closed: {n} object(s) unpreserved")


@session.command("retrieve")
@click.argument("name")
@json_option
@pass_ctx
def session_retrieve(ctx: Context, name: str, as_json: bool) -> None:
    """Retrieve a session the previous boot handed over (once); its objects can then be restored."""
    with ctx.machine().transaction() as tx:
        info = retrieve_session(tx, name)
    if as_json:
        emit_json(info)
    else:
        render.result(f"session {name!r} retrieved: {info.objects} object(s)")


@session.command("finish")
@click.argument("name")
@json_option
@pass_ctx
def session_finish(ctx: Context, name: str, as_json: bool) -> None:
    """Finish a retrieved session: every object must be able to finish, else EBUSY and nothing changes.

    The report lists the domains that were never restored: their frames stay
    reserved until the next boot.
    """
    with ctx.machine().transaction() as tx:
        report = finish_session(tx, name)
    if as_json:
        emit_json(report)
    else:
        render.result(
            f"session {name!r} finished: {len(report.domains_reclaimed)} domain(s) reclaimed, "
            f"{len(report.devices_reattached)} device(s) re-attached, "
            f"{len(report.never_reclaimed)} never reclaimed ({report.frames_never_reclaimed} frame(s))"
        )


@click.group(cls=Group)
def device() -> None:
    """PCI devices: attach to a domain, preserve across a live update, replace after it."""


@device.command("attach")
@click.argument("bdf")
@click.argument("domain_id", type=ID)
@click.option("--did", type=ID, help="Hardware domain id to use (default: the domain's, or the lowest free).")
@click.option("--owner", help="DMA owner (e.g. the VFIO user); only it may attach or replace later.")
@json_option
@pass_ctx
def device_attach(ctx: Context, bdf: str, domain_id: int, did: int | None, owner: str | None, as_json: bool) -> None:
    """Attach device BDF (segment:bus:dev.fn) to DOMAIN_ID.

    \b
    Example:
      iommupt-store device attach 0000:3b:00.1 1 --owner vfio-vm1
    """
    with ctx.machine().transaction() as tx:
        attach(tx, bdf, domain_id, owner=owner, did=did)
        info = next(d for d in list_devices(tx) if d.bdf == parse_bdf(bdf))
    if as_json:
        emit_json(info)
    else:
        render.result(f"device {info.bdf} attached to domain {domain_id} with domain id {info.did}")


@device.command("preserve")
@click.argument("bdf")
@click.option("--session", "session_name", required=True, help="The session that holds the device's domain.")
@click.option("--token", type=INT, required=True, help="Token of the device in the handover.")
@json_option
@pass_ctx
def device_preserve(ctx: Context, bdf: str, session_name: str, token: int, as_json: bool) -> None:
    """Preserve BDF's attachment; its domain must already be preserved in the same session."""
    with ctx.machine().transaction() as tx:
        desc = preserve_device(tx, session_name, bdf, token)
    if as_json:
        emit_json({"token": f"{token:#x}", "descriptor": desc.model_dump(mode="json")})
    else:
        render.result(f"device {desc.bdf} preserved in session {session_name!r} (domain id {desc.did})")


@device.command("replace")
@click.argument("bdf")
@click.argument("domain_id", type=ID)
@click.option("--owner", help="Must be the device's preserving owner.")
@json_option
@pass_ctx
def device_replace(ctx: Context, bdf: str, domain_id: int, owner: str | None, as_json: bool) -> None:
    """Move BDF from its restored domain to DOMAIN_ID; the restored domain is freed when unused."""
    with ctx.machine().transaction() as tx:
        freed = replace(tx, bdf, domain_id, owner=owner)
    if as_json:
        emit_json({"device": bdf, "domain": domain_id, "freed_domain": freed})
    else:
        render.result(f"device {bdf} now on domain {domain_id}" + (f"; restored domain {freed} freed" if freed else ""))


@device.command("detach")
@click.argument("bdf")
@click.option("--owner", help="Must be the device's owner.")
@json_option
@pass_ctx
def device_detach(ctx: Context, bdf: str, owner: str | None, as_json: bool) -> None:
    """Detach BDF from its domain: its DMA is blocked from now on."""
    with ctx.machine().transaction() as tx:
        detach(tx, bdf, owner=owner)
    if as_json:
        emit_json({"device": parse_bdf(bdf), "attached": False})
    else:
        render.result(f"device {parse_bdf(bdf)} detached")


@device.command("translate")
@click.argument("bdf")
@click.argument("iova", type=INT)
@json_option
@pass_ctx
def device_translate(ctx: Context, bdf: str, iova: int, as_json: bool) -> None:
    """What a DMA from BDF to IOVA hits, through the device's current attachment."""
    with ctx.observer().transaction(write=False) as tx:
        t = dma_walker(tx, bdf).translate(iova)
    if as_json:
        emit_json({"iova": f"{iova:#x}", "phys": None if t.phys is None else f"{t.phys:#x}", "fault": t.fault})
    elif t.phys is None:
        render.result(f"{iova:#x} -> fault: {t.fault} (level {t.level})")
    else:
        render.result(f"{iova:#x} -> {t.phys:#x}")


@click.command(cls=Command)
@json_option
@pass_ctx
def devices(ctx: Context, as_json: bool) -> None:
    """Devices of the machine and their attachments."""
    with ctx.observer().transaction(write=False) as tx:
        infos = list_devices(tx)
    if as_json:
        emit_json([i.model_dump(mode="json") for i in infos])
        return
    render.table(
        ("device", "owner", "domain", "domain id", "attachment"),
        ((i.bdf, i.owner, i.domain, i.did, i.attachment) for i in infos),
    )


COMMANDS = [sessions, session, device, devices]
