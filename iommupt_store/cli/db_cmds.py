"""``init``, ``status`` and ``db ...``: the store itself."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from ..db import migrate
from ..db.engine import resolve_url, shown_url, translate_db_errors
from ..names import check_machine_name
from ..reports import MigrationReport
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


_MIGRATIONS_HELP = (
    "A directory of your own revisions (repeatable); added to $IOMMUPT_MIGRATIONS (os.pathsep-separated)."
)
_META = "iommupt.migrations"


def _remember_dirs(ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    ctx.find_root().meta.setdefault(_META, []).extend(value)
    return value


migrations_option = click.option(
    "--migrations",
    "migrations",
    multiple=True,
    metavar="DIR",
    expose_value=False,
    callback=_remember_dirs,
    help=_MIGRATIONS_HELP,
)


def _dirs() -> list[Path]:
    """The user's revision directories: --migrations on the group and on the command, then the variable."""
    return migrate.user_dirs(click.get_current_context().find_root().meta.get(_META, []))


@click.group(cls=Group)
@migrations_option
def db() -> None:
    """Schema revisions (Alembic): upgrade, downgrade, stamp, current, heads, history, revision.

    Your own revisions live in your own directories, named by --migrations
    (here or on each command) or $IOMMUPT_MIGRATIONS; they chain on this
    package's head. See docs/migrations.md.

    \b
    Examples:
      iommupt-store db upgrade                       # backup first, then upgrade
      iommupt-store db downgrade 0005 --json
      iommupt-store db revision -m "add a column" --dir ./my-migrations
      IOMMUPT_MIGRATIONS=./my-migrations iommupt-store db upgrade
    """


def _url(ctx: Context) -> str:
    return resolve_url(ctx.db if ctx.db is not None else default_location())


def _report(report: MigrationReport, as_json: bool, verb: str) -> None:
    if report.backup:
        render.note(f"backup: {report.backup}")
    if report.backup_note:
        render.note(f"note: {report.backup_note}")
    if as_json:
        emit_json(report)
        return
    for line in report.dropped:
        render.result(f"dropped: {line}")
    if not report.revisions:
        render.result(f"{report.url} is already at {report.from_revision or 'base'}: nothing to do")
        return
    render.result(
        f"{verb} {report.url} from {report.from_revision or 'base'} to {report.to_revision or 'base'} "
        f"({', '.join(report.revisions)})"
    )


_no_backup = click.option("--no-backup", is_flag=True, help="Do not write the backup copy of an SQLite file first.")


@db.command()
@click.argument("revision", default="head")
@click.option(
    "--sql", "offline", is_flag=True, help="Print the SQL instead of running it (FROM:TO, or from the current)."
)
@_no_backup
@migrations_option
@json_option
@pass_ctx
def upgrade(ctx: Context, revision: str, offline: bool, no_backup: bool, as_json: bool) -> None:
    """Upgrade the schema and the stored data to REVISION (default: head).

    Only an existing database is upgraded; 'init' creates a new one. An SQLite
    file is first copied (VACUUM INTO) to <file>.bak-<revision>-<UTC time>,
    printed on stderr, unless --no-backup. --sql prints the SQL of schema
    revisions instead (a data migration needs the live database).

    \b
    Examples:
      iommupt-store --db lab.db db upgrade
      iommupt-store --db lab.db db upgrade --sql 0006:head > upgrade.sql
    """
    url = _url(ctx)
    if offline:
        report = migrate.offline_sql(url, revision, dirs=_dirs())
        if not report.revisions:
            render.note(f"nothing to upgrade: {report.from_revision} is already {revision}")
        if as_json:
            emit_json(report)
        elif report.sql:
            render.result(report.sql.rstrip("\n"))
        return
    report = migrate.run(url, "upgrade", revision, dirs=_dirs(), backup=not no_backup)
    _report(report, as_json, "upgraded")


@db.command(context_settings={"ignore_unknown_options": True})  # so that "-1" is a revision
@click.argument("revision")
@click.option("--force", is_flag=True, help="Downgrade even when it drops data (listing what it dropped).")
@_no_backup
@migrations_option
@json_option
@pass_ctx
def downgrade(ctx: Context, revision: str, force: bool, no_backup: bool, as_json: bool) -> None:
    """Downgrade the schema to REVISION: a revision id, a step such as -1, or base (empty).

    Refused, changing nothing, when a reverted revision would drop data (LUO
    sessions, devices, handover entries ...): the message lists it; --force
    drops it. Data that can be computed again (digests, the mapping ledger,
    views) is not counted. An SQLite file is backed up first, unless --no-backup.

    \b
    Examples:
      iommupt-store db downgrade 0005
      iommupt-store db downgrade 0003 --force --json
    """
    url = _url(ctx)
    report = migrate.run(url, "downgrade", revision, dirs=_dirs(), backup=not no_backup, force=force)
    _report(report, as_json, "downgraded")


@db.command()
@click.argument("revision")
@click.option("--purge", is_flag=True, help="Replace whatever the version table holds, even an unknown revision.")
@migrations_option
@json_option
@pass_ctx
def stamp(ctx: Context, revision: str, purge: bool, as_json: bool) -> None:
    """Record REVISION as the database's without running any migration.

    For a database whose schema you changed by hand, or one restored from a
    dump of another revision. Nothing but the version table changes.

    \b
    Example:
      iommupt-store db stamp 0006
    """
    url = _url(ctx)
    before, after = migrate.stamp(url, revision, dirs=_dirs(), purge=purge)
    data = {"url": shown_url(url), "from_revision": before, "to_revision": after}
    if as_json:
        emit_json(data)
    else:
        render.result(f"stamped {shown_url(url)} at {after or 'base'} (was {before or 'base'})")


@db.command()
@migrations_option
@json_option
@pass_ctx
def current(ctx: Context, as_json: bool) -> None:
    """The database's revision and the head(s) of the known revisions."""
    url = _url(ctx)
    from ..db.engine import make_engine

    dirs = _dirs()
    engine = make_engine(url, create=False)
    try:
        with translate_db_errors(url), engine.connect() as conn:
            rev = migrate.current_revision(conn)
    finally:
        engine.dispose()
    heads = migrate.heads(dirs)
    head = heads[0] if len(heads) == 1 else None
    newer = rev is not None and rev not in migrate.known_revisions(dirs)
    data = {
        "url": shown_url(url),
        "current": rev,
        "head": head,
        "heads": heads,
        "up_to_date": rev in heads,
        "newer": newer,
    }
    if as_json:
        emit_json(data)
    else:
        note = "" if rev in heads else " (unknown revision: see $IOMMUPT_MIGRATIONS)" if newer else " (upgrade needed)"
        render.result(f"{shown_url(url)}: revision {rev or '(none)'}; head {', '.join(heads)}{note}")


@db.command()
@migrations_option
@json_option
def heads(as_json: bool) -> None:
    """The newest revision(s): the package's head, or your own on top of it."""
    found = migrate.head_scripts(_dirs())
    if as_json:
        emit_json(found)
        return
    for h in found:
        render.result(f"{h['revision']}  ({h['location']})  {h['message']}")


@db.command()
@migrations_option
@json_option
def history(as_json: bool) -> None:
    """Every schema revision this version knows (and yours), oldest first."""
    revs = migrate.history(_dirs())
    if as_json:
        emit_json(revs)
        return
    for r in revs:
        where = "" if r["location"] == "package" else f"  [{r['location']}]"
        render.result(f"{r['revision']}  (from {r['down_revision'] or 'base'})  {r['message']}{where}")


@db.command()
@click.option("-m", "--message", required=True, help="What the revision does (its docstring and file name).")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False),
    help="Your versions directory (created if missing; never inside the installed package).",
)
@click.option("--rev-id", help="The new revision's id (default: a random one).")
@migrations_option
@json_option
def revision(message: str, directory: str, rev_id: str | None, as_json: bool) -> None:
    """Create an empty revision in your own versions directory, chained on the current head.

    Fill in its upgrade() and downgrade(); define would_lose(conn) if the
    downgrade drops data, and data_migration = True if it reads rows. Then
    name the directory in $IOMMUPT_MIGRATIONS (or --migrations) for every
    command that opens the store.

    \b
    Example:
      iommupt-store db revision -m "add a note to each device" --dir ./my-migrations
      iommupt-store db revision -m "lab notes" --dir ./my-migrations --rev-id lab01
    """
    made = migrate.new_revision(message, directory, dirs=_dirs(), rev_id=rev_id)
    if as_json:
        emit_json(made)
    else:
        render.result(f"created revision {made['revision']} on {made['down_revision']}: {made['path']}")


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
