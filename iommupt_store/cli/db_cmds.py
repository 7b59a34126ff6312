"""``init``, ``status`` and ``db ...``: the store itself."""

from __future__ import annotations

import click
from click.core import ParameterSource
from rich.table import Table

from ..db import migrate
from ..db.engine import resolve_url, translate_db_errors
from ..store import DEFAULT_MEM_BYTES, Store, default_location
from .common import INT, Context, Group, emit_json, err_console, json_option, pass_ctx


@click.command()
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

    \b
    Example:
      iommupt-store --db lab.db --machine host1 init --mem 16G
    """
    store = Store.init(ctx.db)
    ctx._store = store
    created = ctx.machine_name not in {m.name for m in store.status().machines}
    if created:
        store.create_machine(ctx.machine_name, mem_bytes)
    machine = store.machine(ctx.machine_name)
    result = {
        "url": store.url,
        "machine": machine.name,
        "created": created,
        "boot": machine.boot_number,
        "mem_bytes": machine.mem_bytes,
    }
    if as_json:
        emit_json(result)
    else:
        verb = "created" if created else "already exists:"
        err_console.print(
            f"machine {machine.name!r} {verb} {machine.mem_bytes >> 20} MiB, boot {machine.boot_number}, in {store.url}"
        )


@click.command()
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
    table = Table(title=f"{st.url} (schema {st.revision})")
    for col in ("machine", "memory", "boot", "state", "pages used", "boots so far"):
        table.add_column(col)
    for m in st.machines:
        cur = m.current_boot
        state = "running" if cur and cur.end_kind is None else f"ended ({cur.end_kind})" if cur else "never booted"
        table.add_row(
            m.name,
            f"{m.mem_bytes >> 20} MiB",
            str(cur.number if cur else "-"),
            state,
            f"{m.pages_allocated} ({m.bytes_allocated >> 10} KiB)",
            str(len(m.boots)),
        )
    err_console.print(table)


@click.group(cls=Group)
def db() -> None:
    """Schema revisions (Alembic): upgrade, downgrade, current, history."""


def _url(ctx: Context) -> str:
    return resolve_url(ctx.db or default_location())


@db.command()
@click.argument("revision", default="head")
@pass_ctx
def upgrade(ctx: Context, revision: str) -> None:
    """Upgrade the schema (and stored descriptors) to REVISION (default: head)."""
    migrate.upgrade(_url(ctx), revision)
    err_console.print(f"upgraded {_url(ctx)} to {revision}")


@db.command(context_settings={"ignore_unknown_options": True})  # so that "-1" is a revision
@click.argument("revision")
@pass_ctx
def downgrade(ctx: Context, revision: str) -> None:
    """Downgrade the schema to REVISION (e.g. -1, or a revision id; 'base' empties it)."""
    migrate.downgrade(_url(ctx), revision)
    err_console.print(f"downgraded {_url(ctx)} to {revision}")


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
    data = {"url": url, "current": rev, "head": head, "up_to_date": rev == head, "newer": newer}
    if as_json:
        emit_json(data)
    else:
        note = "" if rev == head else " (written by a newer iommupt-store)" if newer else " (upgrade needed)"
        err_console.print(f"{url}: revision {rev or '(none)'}; head {head}{note}")


@db.command()
@json_option
def history(as_json: bool) -> None:
    """Every schema revision this version knows, oldest first."""
    revs = migrate.history()
    if as_json:
        emit_json(revs)
        return
    for r in revs:
        err_console.print(f"{r['revision']}  (from {r['down_revision'] or 'base'})  {r['message']}")


@click.command()
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

    with ctx.machine().transaction(write=False) as tx:
        report = run_fsck(tx)
    if as_json:
        emit_json(report)
    else:
        for p in report.problems:
            err_console.print(f"[red]problem:[/] {p}")
        err_console.print(
            f"machine {report.machine!r}, boot {report.boot}: {report.domains_checked} domain(s) checked, "
            + ("no problems" if report.ok else f"{len(report.problems)} problem(s)")
        )
    if not report.ok:
        raise SystemExit(EXIT_DATAERR)
