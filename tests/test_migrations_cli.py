"""``db upgrade/downgrade`` safety and the user's own revisions.

Backups (``VACUUM INTO`` beside an SQLite file, before anything changes),
downgrades that refuse to drop data without ``--force``, and revisions users
script themselves (``db revision``, ``--migrations``/``$IOMMUPT_MIGRATIONS``,
``db heads``, ``db stamp``, ``db upgrade --sql``), and a store opening at a
user's revision on top of the package's head. The PostgreSQL variants run
when ``IOMMUPT_TEST_PG_URL`` is set.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import Result

from iommupt_store.db import migrate
from iommupt_store.db.backup import backup_name
from iommupt_store.errors import EXIT_DATAERR, NotPermitted, SchemaError
from iommupt_store.store import Store
from tests.conftest import InvokeCli, RunPy, one_error_line, sqlite_dump
from tests.test_postgres import fresh_pg_database

PG_URL = os.environ.get("IOMMUPT_TEST_PG_URL")
HEAD = migrate.SCHEMA_HEAD


def ok(r: Result) -> Result:
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r


def refused(r: Result, code: int = 1) -> str:
    assert r.exit_code == code, (r.stdout, r.stderr)
    return one_error_line(r.stderr)


@pytest.fixture
def world(cli: InvokeCli) -> None:
    """A domain with a mapping, a device, a session preserving both, sealed: something to lose.

    Written by the seed-era kernel (``lu-v3``): revision 0007 can then be undone without loss, and the
    older revisions' losses are what these tests look at."""
    for args in (
        ["init", "--mem", "64M"],
        ["domain", "create", "x86_64"],
        ["map", "1", "0x0", "0x200000", "2M"],
        ["device", "attach", "0000:3b:00.1", "1", "--owner", "vm1"],
        ["session", "create", "s1"],
        ["preserve", "1", "--token", "0x10", "--session", "s1"],
        ["device", "preserve", "0000:3b:00.1", "--session", "s1", "--token", "0x11"],
        ["liveupdate"],
    ):
        ok(cli("--kernel", "lu-v3", *args))


def revision_of(path: Path) -> str | None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None
    finally:
        conn.close()


def backups(db_path: Path) -> list[Path]:
    return sorted(db_path.parent.glob(f"{db_path.name}.bak-*"))


# -- backups -------------------------------------------------------------------------------------------
def test_upgrade_writes_an_openable_backup_first(world: None, cli: InvokeCli, db_path: Path) -> None:
    ok(cli("db", "downgrade", "0004", "--no-backup"))
    assert backups(db_path) == []
    at_0004 = sqlite_dump(db_path)
    r = ok(cli("db", "upgrade", "--json"))
    report = json.loads(r.stdout)
    path = Path(report["backup"])
    assert f"backup: {path}" in r.stderr and backups(db_path) == [path]
    assert path.name.startswith("store.db.bak-0004-") and path.stat().st_mode & 0o777 == 0o600
    assert revision_of(path) == "0004" and sqlite_dump(path) == at_0004
    # every revision from 0004 to the head ran, in order (a slice would pass with none)
    assert report["revisions"] == [f"{n:04d}" for n in range(5, int(HEAD) + 1)]
    assert revision_of(db_path) == HEAD


def test_no_backup_when_nothing_changes_or_when_asked(world: None, cli: InvokeCli, db_path: Path) -> None:
    r = ok(cli("db", "upgrade"))
    assert "already at" in r.stdout and "backup" not in r.stderr
    ok(cli("db", "downgrade", HEAD))
    ok(cli("db", "downgrade", "-1", "--no-backup"))
    assert backups(db_path) == []
    r = ok(cli("db", "upgrade", "--no-backup", "--json"))
    assert json.loads(r.stdout)["backup"] is None


def test_a_backup_never_overwrites(tmp_path: Path) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = backup_name(tmp_path / "a.db", "0005", when)
    assert first.name == "a.db.bak-0005-20260102T030405Z"
    first.write_text("x")
    second = backup_name(tmp_path / "a.db", "0005", when)
    assert second.name == "a.db.bak-0005-20260102T030405Z-1"


def test_in_memory_databases_get_no_backup() -> None:
    report = migrate.run("sqlite://", "upgrade", "head", create=True, backup=True)
    assert report.to_revision == HEAD and report.backup is None and report.backup_note is None


# -- downgrades that would lose data ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "lost"),
    [
        ("0003", ["1 LUO session(s)", "1 device(s)", "1 device handover entry"]),
        ("0002", ["2 handover entries", "preservation record(s)", "1 LUO session(s)"]),
        ("0001", ["1 domain(s)", "2 handover entries"]),
        ("base", ["1 machine(s) with 1 boot(s)"]),
    ],
)
def test_a_lossy_downgrade_is_refused_then_forced(
    world: None, cli: InvokeCli, db_path: Path, target: str, lost: list[str]
) -> None:
    before = sqlite_dump(db_path)
    line = refused(cli("db", "downgrade", target))
    assert line.startswith("error: EPERM: ") and "--force" in line and "nothing changed" in line
    for what in lost:
        assert what in line
    assert sqlite_dump(db_path) == before and backups(db_path) == []
    r = ok(cli("db", "downgrade", target, "--force"))
    for what in lost:
        assert what in r.stdout
    assert revision_of(db_path) == (None if target == "base" else target)
    assert len(backups(db_path)) == 1


def test_lossless_downgrades_need_no_force(world: None, cli: InvokeCli, db_path: Path) -> None:
    """0006 (ledger, views) and 0005 (digests) hold only what their upgrade computes again."""
    r = ok(cli("db", "downgrade", "0004", "--json"))
    assert json.loads(r.stdout)["dropped"] == []
    ok(cli("db", "upgrade"))
    ok(cli("fsck"))


def test_an_empty_store_downgrades_to_base_without_force(cli: InvokeCli, db_path: Path) -> None:
    Store.init(db_path).close()
    ok(cli("db", "downgrade", "base", "--no-backup"))
    assert revision_of(db_path) is None


def test_the_library_refuses_too(world: None, db_url: str) -> None:
    with pytest.raises(NotPermitted, match="LUO session"):
        migrate.downgrade(db_url, "0003")


# -- the user's own revisions ----------------------------------------------------------------------------
NOTE_TABLE = """
def upgrade() -> None:
    op.create_table("lab_note", sa.Column("id", sa.Integer, primary_key=True), sa.Column("text", sa.String(80)))


def downgrade() -> None:
    op.drop_table("lab_note")
"""
READS_ROWS = """
def upgrade() -> None:
    op.get_bind().execute(sa.text("SELECT count(*) FROM machine")).scalar_one()


def downgrade() -> None:
    pass
"""


def make_revision(cli: InvokeCli, directory: Path, body: str, *extra: str) -> dict[str, str]:
    made = json.loads(ok(cli("db", "revision", "-m", "lab notes", "--dir", str(directory), "--json", *extra)).stdout)
    path = Path(made["path"])
    source = path.read_text()
    path.write_text(source[: source.index("\ndef upgrade()")] + body)
    return made


@pytest.fixture
def mine(tmp_path: Path) -> Path:
    return tmp_path / "mine"


def test_revision_chains_on_the_head_and_the_users_chain(cli: InvokeCli, mine: Path) -> None:
    first = make_revision(cli, mine, NOTE_TABLE)
    assert first["down_revision"] == HEAD and Path(first["path"]).parent == mine
    second = make_revision(cli, mine, READS_ROWS)
    assert second["down_revision"] == first["revision"]
    heads = json.loads(ok(cli("db", "heads", "--json", "--migrations", str(mine))).stdout)
    assert [h["revision"] for h in heads] == [second["revision"]] and heads[0]["location"] == str(mine)
    assert json.loads(ok(cli("db", "heads", "--json")).stdout)[0]["location"] == "package"
    hist = json.loads(ok(cli("db", "--migrations", str(mine), "history", "--json")).stdout)
    assert [h["revision"] for h in hist[-3:]] == [HEAD, first["revision"], second["revision"]]


def test_revision_refuses_the_package_directory(cli: InvokeCli) -> None:
    line = refused(cli("db", "revision", "-m", "x", "--dir", str(migrate.package_versions_dir())))
    assert "inside the installed package" in line
    assert sorted(p.name for p in migrate.package_versions_dir().glob("*.py"))[-1].startswith(HEAD)


def test_users_revisions_upgrade_open_and_come_back(
    cli: InvokeCli, db_path: Path, mine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(cli("init", "--mem", "16M"))
    made = make_revision(cli, mine, NOTE_TABLE)
    ok(cli("db", "upgrade", "--migrations", str(mine), "--no-backup"))
    assert revision_of(db_path) == made["revision"]
    # without the directory: one line naming the variable; with it, the store opens (past SCHEMA_HEAD)
    line = refused(cli("status"), EXIT_DATAERR)
    assert "IOMMUPT_MIGRATIONS" in line and made["revision"] in line
    ok(cli("status", env={"IOMMUPT_MIGRATIONS": str(mine)}))
    monkeypatch.setenv("IOMMUPT_MIGRATIONS", str(mine))
    Store(db_path).close()
    Store.init(db_path).close()  # init upgrades with the variable's directories too: nothing to do
    cur = json.loads(ok(cli("db", "current", "--json")).stdout)
    assert cur["current"] == made["revision"] and cur["up_to_date"] and not cur["newer"]
    ok(cli("db", "downgrade", HEAD, "--no-backup"))
    assert revision_of(db_path) == HEAD


def test_an_older_revision_is_told_to_upgrade(cli: InvokeCli, db_path: Path) -> None:
    ok(cli("--kernel", "lu-v3", "init", "--mem", "16M"))  # a boot 0007 can drop without loss
    ok(cli("db", "downgrade", "0005", "--no-backup"))
    with pytest.raises(SchemaError, match=r"older than this version.s .*db upgrade"):
        Store(db_path)


def test_a_missing_migrations_directory_is_one_line(cli: InvokeCli, tmp_path: Path) -> None:
    ok(cli("init", "--mem", "16M"))
    line = refused(cli("db", "heads", "--migrations", str(tmp_path / "nowhere")))
    assert "ENOENT" in line and "nowhere" in line


def test_stamp(cli: InvokeCli, db_path: Path) -> None:
    ok(cli("init", "--mem", "16M"))
    before = sqlite_dump(db_path)
    r = ok(cli("db", "stamp", "0005", "--json"))
    assert json.loads(r.stdout) == {"url": f"sqlite:///{db_path}", "from_revision": HEAD, "to_revision": "0005"}
    ok(cli("db", "stamp", HEAD))
    assert sqlite_dump(db_path) == before
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE alembic_version SET version_num = 'f00d'")
    conn.commit()
    conn.close()
    assert "f00d" in refused(cli("db", "stamp", HEAD), EXIT_DATAERR)
    ok(cli("db", "stamp", HEAD, "--purge"))
    assert revision_of(db_path) == HEAD


def test_offline_sql_of_schema_revisions_only(cli: InvokeCli, db_path: Path, mine: Path) -> None:
    ok(cli("init", "--mem", "16M"))
    before = sqlite_dump(db_path)
    made = make_revision(cli, mine, NOTE_TABLE)
    r = ok(cli("db", "--migrations", str(mine), "upgrade", "--sql"))
    assert "CREATE TABLE lab_note" in r.stdout and made["revision"] in r.stdout
    line = refused(cli("db", "upgrade", "--sql", "base:head"))
    assert "data migration" in line and "needs a live database" in line and "0005" in line
    assert sqlite_dump(db_path) == before
    # a revision that reads rows without saying so: a clear line, not a traceback
    make_revision(cli, mine, READS_ROWS)
    line = refused(cli("db", "--migrations", str(mine), "upgrade", "--sql", f"{made['revision']}:head"))
    assert "data_migration = True" in line


def test_opening_a_store_at_the_head_does_not_import_alembic(run_py: RunPy, db_path: Path) -> None:
    Store.init(db_path).close()
    code = (
        "import sys\nfrom iommupt_store.store import Store\nStore(sys.argv[1]).close()\nprint('alembic' in sys.modules)"
    )
    r = run_py(code, str(db_path))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


# -- PostgreSQL -------------------------------------------------------------------------------------------
@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="IOMMUPT_TEST_PG_URL is not set")
def test_postgres_user_revisions_refusal_and_no_backup(cli: InvokeCli, pg_url: str, mine: Path) -> None:
    ok(cli("--kernel", "lu-v3", "init", "--mem", "64M", db=pg_url))  # a boot 0007 can drop without loss
    for args in (
        ["domain", "create", "x86_64"],
        ["device", "attach", "0000:3b:00.1", "1", "--owner", "vm1"],
        ["session", "create", "s1"],
        ["preserve", "1", "--token", "0x10", "--session", "s1"],
    ):
        ok(cli(*args, db=pg_url))
    line = refused(cli("db", "downgrade", "0003", db=pg_url))
    assert "1 LUO session(s)" in line
    r = ok(cli("db", "downgrade", "0004", "--json", db=pg_url))
    assert json.loads(r.stdout)["backup"] is None and "pg_dump" in r.stderr
    assert "pg_dump" in json.loads(r.stdout)["backup_note"]
    r = ok(cli("db", "upgrade", "--no-backup", db=pg_url))
    assert "pg_dump" not in r.stderr
    made = make_revision(cli, mine, NOTE_TABLE)
    sql = ok(cli("db", "--migrations", str(mine), "upgrade", "--sql", db=pg_url)).stdout
    assert "CREATE TABLE lab_note" in sql
    ok(cli("db", "--migrations", str(mine), "upgrade", db=pg_url))
    assert "IOMMUPT_MIGRATIONS" in refused(cli("status", db=pg_url), EXIT_DATAERR)
    ok(cli("status", db=pg_url, env={"IOMMUPT_MIGRATIONS": str(mine)}))
    ok(cli("db", "stamp", HEAD, "--migrations", str(mine), db=pg_url))
    ok(cli("db", "stamp", made["revision"], "--migrations", str(mine), db=pg_url))
    ok(cli("db", "downgrade", HEAD, "--migrations", str(mine), db=pg_url))
    ok(cli("fsck", db=pg_url))
