"""Alembic, driven from code: no alembic.ini, the scripts ship with the package.

The package's own revisions live in ``migrations/versions``; a user's own
revisions live in directories named by ``--migrations`` or
``$IOMMUPT_MIGRATIONS`` and chain on the package's head. Alembic's
``version_locations`` joins them.

A revision module may define:

- ``would_lose(conn) -> list[str]``: one line per kind of user data its
  downgrade would drop (empty: lossless). A downgrade that would lose anything
  is refused unless forced.
- ``data_migration = True``: its upgrade or downgrade reads rows, so it needs
  a live database; offline SQL (``--sql``) refuses it.

Importing this module loads neither SQLAlchemy nor pydantic nor Alembic, so
that ``SCHEMA_HEAD`` is cheap to read (``status_fast``); each function imports
what it uses.
"""

from __future__ import annotations

import io
import os
import re
import sys
from argparse import Namespace
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import InvalidArgument, NotFound, NotPermitted, SchemaError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import Script, ScriptDirectory
    from sqlalchemy import Connection

    from ..reports import MigrationReport

UPGRADE_HINT = "iommupt-store db upgrade"
#: the environment variable naming the user's own revision directories (os.pathsep-separated)
ENV_MIGRATIONS = "IOMMUPT_MIGRATIONS"
#: the newest revision in migrations/versions (a test keeps it equal to Alembic's head); opening a
#: store compares against it without importing Alembic, which would cost every process ~0.2 s
SCHEMA_HEAD = "0009"


def migrations_dir() -> Path:
    """The Alembic scripts: inside the installed wheel, or at the top of a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError("the migration scripts are missing from this installation")


def package_versions_dir() -> Path:
    return migrations_dir() / "versions"


def user_dirs(given: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """The user's revision directories: ``given`` (``--migrations``), then ``$IOMMUPT_MIGRATIONS``."""
    names = [os.fspath(d) for d in given]
    names += [d for d in os.environ.get(ENV_MIGRATIONS, "").split(os.pathsep) if d]
    own = package_versions_dir().resolve()
    out: list[Path] = []
    for name in names:
        if not name.strip():
            raise InvalidArgument(f"a migrations directory is empty: name one with --migrations or ${ENV_MIGRATIONS}")
        path = Path(name).expanduser().absolute()
        if not path.is_dir():
            raise NotFound(f"migrations directory {name} does not exist (from --migrations or ${ENV_MIGRATIONS})")
        if path.resolve() != own and path not in out:
            out.append(path)
    return out


def alembic_config(
    url: str,
    connection: Connection | None = None,
    stdout: TextIO | None = None,
    *,
    dirs: Sequence[Path] = (),
    output: TextIO | None = None,
) -> Config:
    from alembic.config import Config

    cfg = Config(stdout=stdout or sys.stdout, output_buffer=output, cmd_opts=Namespace(quiet=True))
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    locations = [package_versions_dir(), *dirs]
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def scripts(dirs: Sequence[Path] = ()) -> ScriptDirectory:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory.from_config(alembic_config("sqlite://", dirs=dirs))
    except CommandError as e:  # e.g. a user's revision whose down_revision is unknown
        raise SchemaError(f"cannot load the revisions: {e}") from e


def heads(dirs: Sequence[Path] = ()) -> list[str]:
    return sorted(scripts(dirs).get_heads())


def head_revision(dirs: Sequence[Path] = ()) -> str:
    found = heads(dirs)
    if len(found) != 1:
        raise SchemaError(f"the revisions have {len(found)} heads ({', '.join(found)}); expected one")
    return found[0]


def known_revisions(dirs: Sequence[Path] = ()) -> set[str]:
    return {rev.revision for rev in scripts(dirs).walk_revisions()}


def current_revision(conn: Connection) -> str | None:
    from sqlalchemy import text

    from .engine import table_names

    if "alembic_version" not in table_names(conn):
        return None
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) > 1:
        raise SchemaError(f"the database has {len(rows)} schema heads ({', '.join(rows)}); expected one")
    return rows[0] if rows else None


def _unknown(url: str, rev: str, dirs: Sequence[Path]) -> SchemaError:
    from .engine import shown_url

    where = f"in {os.pathsep.join(map(str, dirs))}" if dirs else f"(set ${ENV_MIGRATIONS} to its directory)"
    return SchemaError(
        f"{shown_url(url)} is at revision {rev}, which this version does not know: written by a newer "
        f"iommupt-store, or one of your own revisions not found {where}"
    )


def check_ours(conn: Connection, url: str, dirs: Sequence[Path] = ()) -> str | None:
    """The database's revision, if it is one this version can work with (or empty).

    Refuses a foreign database (tables but no revision) and one at a revision
    that neither the package nor the user's directories hold.
    """
    from .engine import table_names

    rev = current_revision(conn)
    if rev == SCHEMA_HEAD:
        return rev  # the common case, decided without importing Alembic
    if rev is None:
        # an empty alembic_version table is what 'db downgrade base' leaves behind
        if table_names(conn) - {"alembic_version"}:
            raise SchemaError(f"{url} is not an iommupt-store database (it has tables but no revision)")
    elif rev not in known_revisions(dirs):
        raise _unknown(url, rev, dirs)
    return rev


def check_revision(conn: Connection, url: str) -> None:
    """Refuse a database that is not at our head revision (or a user's revision on top of it)."""
    rev = current_revision(conn)
    if rev == SCHEMA_HEAD:
        return  # without importing Alembic: what nearly every process does
    dirs = user_dirs()
    rev = check_ours(conn, url, dirs)
    if rev is None:
        raise SchemaError(f"{url} holds no iommupt-store schema yet: run 'iommupt-store init'")
    if descends_from(rev, SCHEMA_HEAD, dirs):
        return  # the user's own revisions on top of ours
    raise SchemaError(f"{url} is at revision {rev}, older than this version's {SCHEMA_HEAD}: run '{UPGRADE_HINT}'")


def descends_from(rev: str, ancestor: str, dirs: Sequence[Path] = ()) -> bool:
    """Whether ``rev`` is ``ancestor`` or comes after it."""
    script = scripts(dirs)
    return any(s.revision == ancestor for s in script.iterate_revisions(rev, "base"))


#: what Alembic accepts as a target: an id, head or base, optionally on a branch, optionally a relative step
_REVISION = re.compile(r"(?:\w+@)?(?:\w+(?:[+-]\d+)?|[+-]\d+)")


def _check_target(revision: str) -> None:
    if not _REVISION.fullmatch(revision):
        raise InvalidArgument(
            f"{revision!r} is not a schema revision (give a revision id, 'head', 'base' or a step such as -1)"
        )


def _steps(script: ScriptDirectory, action: str, target: str, current: str | None, url: str) -> list[Script]:
    """The revision scripts ``action`` would run from ``current``, in order (newest first downgrading)."""
    from alembic.util import CommandError

    from .engine import shown_url

    try:
        if action == "upgrade":
            return [s.revision for s in script._upgrade_revs(target, current or "base")]
        return [s.revision for s in script._downgrade_revs(target, current)]
    except CommandError as e:  # e.g. an unknown revision id
        raise InvalidArgument(f"cannot {action} {shown_url(url)} to {target!r}: {e}") from e


def would_lose(conn: Connection, reverted: Sequence[Script]) -> list[str]:
    """What downgrading through ``reverted`` (newest first) would drop, per revision's ``would_lose``."""
    out: list[str] = []
    for s in reverted:
        fn = getattr(s.module, "would_lose", None)
        if fn is not None:
            out += [f"{line} (revision {s.revision})" for line in fn(conn)]
    return out


def run(
    url: str,
    action: str,
    revision: str,
    *,
    dirs: Sequence[Path] = (),
    create: bool = False,
    backup: bool = False,
    force: bool = False,
) -> MigrationReport:
    """Upgrade or downgrade ``url`` to ``revision``.

    ``backup`` writes a copy of an SQLite file first (only when something will
    change). A downgrade that would drop user data is refused (NotPermitted,
    nothing changed) unless ``force``.
    """
    from sqlalchemy import text

    from ..reports import MigrationReport
    from .engine import make_engine, shown_url, sqlite_path, translate_db_errors

    if action not in ("upgrade", "downgrade"):
        raise InvalidArgument(f"unknown migration action {action!r}")
    _check_target(revision)
    # Migrations run with foreign keys off (SQLite's move-and-copy of a referenced
    # table fails otherwise) and are checked before commit instead.
    engine = make_engine(url, foreign_keys=False, create=create)
    shown = shown_url(url)
    try:
        with translate_db_errors(url), engine.connect() as conn:
            current = check_ours(conn, url, dirs)
            script = scripts(dirs)
            steps = _steps(script, action, revision, current, url)
            losses = would_lose(conn, steps) if action == "downgrade" else []
            conn.rollback()
        if losses and not force:
            raise NotPermitted(
                f"downgrading {shown} to {revision} would drop: {'; '.join(losses)}; nothing changed "
                "(give --force to drop them)"
            )
        report = MigrationReport(
            url=shown, action=action, from_revision=current, to_revision=current, revisions=[], dropped=losses
        )
        path = sqlite_path(url)
        if not steps:
            pass  # nothing changes: no backup (the checks below still run)
        elif backup and path is not None:
            from .backup import backup_sqlite

            report.backup = str(backup_sqlite(path, current))
        elif backup and engine.dialect.name != "sqlite":
            from .backup import POSTGRES_NOTE

            report.backup_note = POSTGRES_NOTE
        with translate_db_errors(url), engine.begin() as conn:
            if check_ours(conn, url, dirs) != current:
                raise SchemaError(f"{shown} changed revision while preparing the {action}; nothing changed")
            _alembic(action, alembic_config(url, conn, dirs=dirs), revision, url)
            if conn.dialect.name == "sqlite":
                bad = conn.execute(text("PRAGMA foreign_key_check")).fetchall()
                if bad:
                    raise SchemaError(f"migration to {revision} broke {len(bad)} foreign key(s); rolled back")
            report.to_revision = current_revision(conn)
        report.revisions = [s.revision for s in steps]
        return report
    finally:
        engine.dispose()


def _alembic(action: str, cfg: Config, revision: str, url: str, **kw: Any) -> None:
    from alembic import command
    from alembic.util import CommandError

    from .engine import shown_url

    try:
        getattr(command, action)(cfg, revision, **kw)
    except CommandError as e:  # e.g. an unknown revision id
        raise InvalidArgument(f"cannot {action} {shown_url(url)} to {revision!r}: {e}") from e


def offline_sql(url: str, revision: str, *, dirs: Sequence[Path] = ()) -> MigrationReport:
    """The SQL ``db upgrade`` would run, without running it (Alembic's offline mode).

    ``revision`` is ``FROM:TO`` or just ``TO``, then starting at the database's
    current revision (read only). A data migration cannot be rendered as SQL: refused.
    """
    from ..reports import MigrationReport
    from .engine import make_engine, shown_url, translate_db_errors

    start, _, target = revision.rpartition(":")
    _check_target(target)
    if start:
        _check_target(start)
    else:
        engine = make_engine(url, create=False)
        try:
            with translate_db_errors(url), engine.connect() as conn:
                start = check_ours(conn, url, dirs) or "base"
        finally:
            engine.dispose()
    script = scripts(dirs)
    steps = _steps(script, "upgrade", target, None if start == "base" else start, url)
    data = [s.revision for s in steps if getattr(s.module, "data_migration", False)]
    if data:
        what = (
            f"revision {data[0]} is a data migration"
            if len(data) == 1
            else f"revisions {', '.join(data)} are data migrations"
        )
        raise InvalidArgument(
            f"{what}: reading rows needs a live database "
            "(run 'db upgrade' without --sql, or give --sql a range after it, FROM:TO)"
        )
    out = io.StringIO()
    cfg = alembic_config(url, dirs=dirs, output=out)
    try:
        _alembic("upgrade", cfg, f"{start}:{target}", url, sql=True)
    except (AttributeError, NotImplementedError) as e:  # a revision that reads rows but is not marked
        raise InvalidArgument(
            f"a revision between {start} and {target} cannot be written as SQL ({e}): if it reads rows, "
            "mark it 'data_migration = True' and run it against the database"
        ) from None
    return MigrationReport(
        url=shown_url(url),
        action="upgrade --sql",
        from_revision=start,
        to_revision=target,
        revisions=[s.revision for s in steps],
        sql=out.getvalue(),
    )


def upgrade(url: str, revision: str = "head", *, create: bool = True, dirs: Sequence[Path] | None = None) -> None:
    """Upgrade to ``revision``; ``create=False`` refuses an SQLite file that does not exist yet.

    ``dirs``: the user's revision directories (default: ``$IOMMUPT_MIGRATIONS``).
    """
    run(url, "upgrade", revision, create=create, dirs=user_dirs() if dirs is None else dirs)


def downgrade(url: str, revision: str, *, force: bool = False, dirs: Sequence[Path] | None = None) -> None:
    """Downgrade to ``revision``; refused when it would drop data, unless ``force``."""
    run(url, "downgrade", revision, force=force, dirs=user_dirs() if dirs is None else dirs)


def stamp(url: str, revision: str, *, dirs: Sequence[Path] = (), purge: bool = False) -> tuple[str | None, str | None]:
    """Record ``revision`` as the database's without running anything; (before, after)."""
    from .engine import make_engine, translate_db_errors

    _check_target(revision)
    engine = make_engine(url, foreign_keys=False, create=False)
    try:
        with translate_db_errors(url), engine.begin() as conn:
            before = current_revision(conn) if purge else check_ours(conn, url, dirs)
            _alembic("stamp", alembic_config(url, conn, dirs=dirs), revision, url, purge=purge)
            return before, current_revision(conn)
    finally:
        engine.dispose()


def is_sqlite_file(url: str) -> bool:
    from .engine import sqlite_path

    return sqlite_path(url) is not None


def _location(s: Script, dirs: Sequence[Path]) -> str:
    where = Path(s.path).resolve().parent
    return "package" if where == package_versions_dir().resolve() else str(where)


def history(dirs: Sequence[Path] = ()) -> list[dict[str, str | None]]:
    revs = list(scripts(dirs).walk_revisions())[::-1]
    return [
        {
            "revision": r.revision,
            "down_revision": str(r.down_revision) if r.down_revision else None,
            "message": r.doc,
            "location": _location(r, dirs),
        }
        for r in revs
    ]


def head_scripts(dirs: Sequence[Path] = ()) -> list[dict[str, str | None]]:
    script = scripts(dirs)
    return [
        {"revision": h, "message": s.doc, "location": _location(s, dirs)}
        for h in sorted(script.get_heads())
        if (s := script.get_revision(h)) is not None
    ]


def new_revision(
    message: str, directory: str | os.PathLike[str], *, dirs: Sequence[Path] = (), rev_id: str | None = None
) -> dict[str, str]:
    """A new, empty revision in the user's ``directory``, chained on the current head; its id and file."""
    from alembic import command
    from alembic.util import CommandError

    if rev_id is not None and not re.fullmatch(r"[A-Za-z0-9_]{1,32}", rev_id):
        raise InvalidArgument(f"{rev_id!r} is not a revision id (1 to 32 letters, digits or _)")

    target = Path(directory).expanduser().absolute()
    package_root = Path(__file__).resolve().parent.parent
    for inside in (package_root, migrations_dir().resolve()):
        if target.resolve().is_relative_to(inside):
            raise NotPermitted(f"{target} is inside the installed package: keep your revisions in your own directory")
    target.mkdir(parents=True, exist_ok=True)
    all_dirs = [*dirs, target] if target not in dirs else list(dirs)
    head = head_revision(all_dirs)
    cfg = alembic_config("sqlite://", dirs=all_dirs)
    try:
        if rev_id is not None and rev_id in known_revisions(all_dirs):
            raise InvalidArgument(f"revision {rev_id} exists already")
        made = command.revision(cfg, message=message, head=head, version_path=str(target), rev_id=rev_id)
    except CommandError as e:
        raise InvalidArgument(f"cannot create a revision in {target}: {e}") from e
    assert made is not None and not isinstance(made, list)
    return {"revision": made.revision, "down_revision": head, "path": made.path}
