"""``init``, ``status`` and ``db ...``: the store itself."""

from __future__ import annotations

import click
from click.core import ParameterSource

from ..db import migrate
from ..db.engine import resolve_url, shown_url, translate_db_errors
from ..names import check_machine_name
from ..store import DEFAULT_MEM_BYTES, Store, check_mem_bytes, default_location
from ..units import format_size
from . import render
from .common import INT, Command, Context, Group, emit_json, json_option, pass_ctx


@click.command(cls=Command)
@click.option(
    "--mem",
    "mem_bytes",
    type=INT,
    default=DEFAULT_MEM_BYTES,
    show_default="64G",
    help="Memory size of the new machine (e.g. 64G, 0x100000000).",
)
@json_option
@pass_ctx
def init(ctx: Context, mem_bytes: int, as_json: bool) -> None:
    """Create the database (or upgrade it) and the machine, if they are new.

    An existing machine is kept as it is: init never resizes it (a different
    --mem is reported and ignored).

    \b
    Example:
      iommupt-store --db lab.db --machine host1 init --mem 16G
    """
    # refuse bad input before anything is created
    check_machine_name(ctx.machine_name)
    check_mem_bytes(mem_bytes)
    store = Store.init(ctx.db)
    ctx._store = store
    created = ctx.machine_name not in {m.name for m in store.status().machines}
    if created:
        store.create_machine(ctx.machine_name, mem_bytes)
    machine = store.machine(ctx.machine_name)
    asked = click.get_current_context().get_parameter_source("mem_bytes") != ParameterSource.DEFAULT
    ignored = asked and not created and mem_bytes != machine.mem_bytes
    result = {
        "url": shown_url(store.url),
        "machine": machine.name,
        "created": created,
        "boot": machine.boot_number,
        "mem_bytes": machine.mem_bytes,
        "mem_bytes_ignored": mem_bytes if ignored else None,
    }
    if ignored:
        render.note(
            f"note: machine {machine.name!r} keeps its {format_size(machine.mem_bytes)}: "
            f"init never resizes a machine (--mem {format_size(mem_bytes)} ignored)"
        )
    if as_json:
        emit_json(result)
    else:
        verb = "created" if created else "already exists:"
        render.result(
            f"machine {machine.name!r} {verb} {machine.mem_bytes >> 20} MiB, boot {machine.boot_number}, "
            f"in {shown_url(store.url)}"
        )


@click.command(cls=Command)
@json_option
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    """Machines, their boots and the memory they use.

    All machines, or only the one named by an explicit --machine (or
    $IOMMUPT_MACHINE), which must exist.

    \b
    Example:
      iommupt-store status --json | jq '.machines[].pages_allocated'
    """
    store = ctx.store()
    st = store.status()
    root = click.get_current_context().find_root()
    if root.get_parameter_source("machine") not in (None, ParameterSource.DEFAULT):
        with translate_db_errors(store.url), store.engine.connect() as conn:
            store.machine_id(conn, ctx.machine_name)  # NotFound, naming the machines there
        st = st.model_copy(update={"machines": [m for m in st.machines if m.name == ctx.machine_name]})
    if as_json:
        emit_json(st)
        return
    rows = []
    for m in st.machines:
        cur = m.current_boot
        state = "running" if cur and cur.end_kind is None else f"ended ({cur.end_kind})" if cur else "never booted"
        rows.append(
            (
                m.name,
                f"{m.mem_bytes >> 20} MiB",
                cur.number if cur else "-",
                state,
                f"{m.pages_allocated} ({m.bytes_allocated >> 10} KiB)",
                len(m.boots),
            )
        )
    render.table(
        ("machine", "memory", "boot", "state", "pages used", "boots so far"),
        rows,
        title=f"{shown_url(st.url)} (schema {st.revision})",
    )


@click.group(cls=Group)
def db() -> None:
    """Schema revisions (Alembic): upgrade, downgrade, current, history."""


def _url(ctx: Context) -> str:
    return resolve_url(ctx.db if ctx.db is not None else default_location())


@db.command()
@click.argument("revision", default="head")
@pass_ctx
def upgrade(ctx: Context, revision: str) -> None:
    """Upgrade the schema (and stored descriptors) to REVISION (default: head).

    Only an existing database is upgraded; 'init' creates a new one.
    """
    url = _url(ctx)
    migrate.upgrade(url, revision, create=False)  # only 'init' creates a database
    render.result(f"upgraded {shown_url(url)} to {revision}")


@db.command(context_settings={"ignore_unknown_options": True})  # so that "-1" is a revision
@click.argument("revision")
@pass_ctx
def downgrade(ctx: Context, revision: str) -> None:
    """Downgrade the schema to REVISION (e.g. -1, or a revision id; 'base' empties it)."""
    url = _url(ctx)
    migrate.downgrade(url, revision)
    render.result(f"downgraded {shown_url(url)} to {revision}")


@db.command()
@json_option
@pass_ctx
def current(ctx: Context, as_json: bool) -> None:
    """The database's revision and this version's head."""
    url = _url(ctx)
    from ..db.engine import make_engine

    engine = make_engine(url, create=False)
    try:
        with translate_db_errors(url), engine.connect() as conn:
            rev = migrate.current_revision(conn)
    finally:
        engine.dispose()
    head = migrate.head_revision()
    newer = rev is not None and rev not in migrate.known_revisions()
    data = {"url": shown_url(url), "current": rev, "head": head, "up_to_date": rev == head, "newer": newer}
    if as_json:
        emit_json(data)
    else:
        note = "" if rev == head else " (written by a newer iommupt-store)" if newer else " (upgrade needed)"
        render.result(f"{shown_url(url)}: revision {rev or '(none)'}; head {head}{note}")


@db.command()
@json_option
def history(as_json: bool) -> None:
    """Every schema revision this version knows, oldest first."""
    revs = migrate.history()
    if as_json:
        emit_json(revs)
        return
    for r in revs:
        render.result(f"{r['revision']}  (from {r['down_revision'] or 'base'})  {r['message']}")


@click.command(cls=Command)
@json_option
@pass_ctx
def fsck(ctx: Context, as_json: bool) -> None:
    """Check the machine's stored state against the model's invariants (read-only).

    Every table reachable from a domain's top must be that domain's frame at the
    right level, reached once; no frame may be orphaned; a preserved domain's
    frames must be exactly the preserved ones, bytes unchanged; devices attach
    only to existing domains; SQLite's integrity and foreign-key checks pass.
    Exit code 65 when a problem is found.
    """
    from ..errors import EXIT_DATAERR
    from ..fsck import fsck as run_fsck

    with render.progress_bar("checking the stored state") as advance, ctx.observer().transaction(write=False) as tx:
        report = run_fsck(tx, advance)
    if as_json:
        emit_json(report)
    else:
        for p in report.problems:
            render.result(f"problem: {p}")
        render.result(
            f"machine {report.machine!r}, boot {report.boot}: {report.domains_checked} domain(s) checked, "
            + ("no problems" if report.ok else f"{len(report.problems)} problem(s)")
        )
    if not report.ok:
        raise SystemExit(EXIT_DATAERR)
