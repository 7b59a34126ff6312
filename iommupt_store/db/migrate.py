"""Alembic, driven from code: no alembic.ini, the scripts ship with the package."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sqlalchemy import Connection, text

from ..errors import InvalidArgument, SchemaError
from .engine import make_engine, sqlite_path, table_names, translate_db_errors

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

UPGRADE_HINT = "iommupt-store db upgrade"
#: the newest revision in migrations/versions (a test keeps it equal to Alembic's head); opening a
#: store compares against it without importing Alembic, which would cost every process ~0.2 s
SCHEMA_HEAD = "0007"


def migrations_dir() -> Path:
    """The Alembic scripts: inside the installed wheel, or at the top of a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError("the migration scripts are missing from this installation")


def alembic_config(url: str, connection: Connection | None = None, stdout: TextIO | None = None) -> Config:
    from alembic.config import Config

    cfg = Config(stdout=stdout) if stdout is not None else Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    script = _scripts()
    return {rev.revision for rev in script.walk_revisions()}


def current_revision(conn: Connection) -> str | None:
    if "alembic_version" not in table_names(conn):
        return None
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) > 1:
        raise SchemaError(f"the database has {len(rows)} schema heads ({', '.join(rows)}); expected one")
    return rows[0] if rows else None


def check_ours(conn: Connection, url: str) -> str | None:
    """The database's revision, if it is one this version can work with (or empty).

    Refuses a foreign database (tables but no revision) and one written by a
    newer iommupt-store (a revision this version does not know).
    """
    rev = current_revision(conn)
    if rev == SCHEMA_HEAD:
        return rev  # the common case, decided without importing Alembic
    if rev is None:
        # an empty alembic_version table is what 'db downgrade base' leaves behind
        if table_names(conn) - {"alembic_version"}:
            raise SchemaError(f"{url} is not an iommupt-store database (it has tables but no revision)")
    elif rev not in known_revisions():
        raise SchemaError(
            f"{url} is at revision {rev}, written by a newer iommupt-store; this version knows up to {head_revision()}"
        )
    return rev


def check_revision(conn: Connection, url: str) -> None:
    """Refuse a database that is not at our head revision, saying what to do."""
    rev = check_ours(conn, url)
    if rev == SCHEMA_HEAD:
        return
    head = head_revision()
    if rev == head:
        return
    if rev is None:
        raise SchemaError(f"{url} holds no iommupt-store schema yet: run 'iommupt-store init'")
    raise SchemaError(f"{url} is at revision {rev}, older than this version's {head}: run '{UPGRADE_HINT}'")


#: what Alembic accepts as a target: an id, head or base, optionally on a branch, optionally a relative step
_REVISION = re.compile(r"(?:\w+@)?(?:\w+(?:[+-]\d+)?|[+-]\d+)")


def _run(url: str, action: str, revision: str, *, create: bool = False) -> None:
    if not _REVISION.fullmatch(revision):
        raise InvalidArgument(
            f"{revision!r} is not a schema revision (give a revision id, 'head', 'base' or a step such as -1)"
        )
    # Migrations run with foreign keys off (SQLite's move-and-copy of a referenced
    # table fails otherwise) and are checked before commit instead.
    engine = make_engine(url, foreign_keys=False, create=create)
    try:
        with translate_db_errors(url), engine.begin() as conn:
            from alembic import command
            from alembic.util import CommandError

            check_ours(conn, url)
            cfg = alembic_config(url, conn)
            try:
                getattr(command, action)(cfg, revision)
            except CommandError as e:  # e.g. an unknown revision id
                raise InvalidArgument(f"cannot {action} {url} to {revision!r}: {e}") from e
            if conn.dialect.name == "sqlite":
                bad = conn.execute(text("PRAGMA foreign_key_check")).fetchall()
                if bad:
                    raise SchemaError(f"migration to {revision} broke {len(bad)} foreign key(s); rolled back")
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head", *, create: bool = True) -> None:
    """Upgrade to ``revision``; ``create=False`` refuses an SQLite file that does not exist yet."""
    _run(url, "upgrade", revision, create=create)


def downgrade(url: str, revision: str) -> None:
    _run(url, "downgrade", revision)


def is_sqlite_file(url: str) -> bool:
    return sqlite_path(url) is not None


def history() -> list[dict[str, str | None]]:
    script = _scripts()
    revs = list(script.walk_revisions())[::-1]
    return [
        {
            "revision": r.revision,
            "down_revision": str(r.down_revision) if r.down_revision else None,
            "message": r.doc,
        }
        for r in revs
    ]
