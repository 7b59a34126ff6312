"""Migrations across real processes, from a database users already have.

``tests/data/rev0006-sealed.db`` was written by ``scripts/make_fixture_db.py``
at revision 0006: boot 1 of a machine with an x86_64 domain (mappings in both
halves), a device attached to it, and a LUO session preserving both, sealed by
``liveupdate``. ``rev0006-sealed.json`` records what every probe IOVA
translated to before the kexec.

Each step runs in its own process, as a user would run it: process 2 upgrades
(``db upgrade``, the backup printed and openable), process 3 (and the ones
after it) restore the domain, translate every probe, and finish the session.
The handover was written by the seed-era kernel, so the processes of boot 2
run with ``IOMMUPT_KERNEL=lu-v3``.

The package's head may be the fixture's revision: then a user's own revision
on top of it makes the upgrade do real work, as it does for users.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from iommupt_store.db import migrate
from tests.conftest import RunCli, sqlite_dump

pytestmark = pytest.mark.slow  # a dozen processes per test

DATA = Path(__file__).resolve().parent / "data"
FIXTURE = DATA / "rev0006-sealed.db"
META = json.loads((DATA / "rev0006-sealed.json").read_text())
BOOT2 = {"IOMMUPT_KERNEL": "lu-v3"}

USER_REVISION_BODY = """
data_migration = False


def would_lose(conn: sa.Connection) -> list[str]:
    n = conn.execute(sa.select(sa.func.count()).select_from(sa.table("lab_note"))).scalar_one()
    return [f"{n} lab note(s)"] if n else []


def upgrade() -> None:
    op.create_table(
        "lab_note",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("text", sa.String(200), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("lab_note")
"""


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, (r.args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r


def revision_of(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(conn.execute("SELECT version_num FROM alembic_version").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def old_db(db_path: Path) -> Path:
    assert META["revision"] == "0006" == revision_of(FIXTURE)
    shutil.copyfile(FIXTURE, db_path)
    return db_path


def user_revision(run_cli: RunCli, directory: Path) -> str:
    """A user's schema revision on top of the current head (made by 'db revision' in its own process)."""
    made = json.loads(ok(run_cli("db", "revision", "-m", "lab notes", "--dir", str(directory), "--json")).stdout)
    path = Path(made["path"])
    source = path.read_text()
    head, _, _ = source.partition("\ndata_migration = False")
    path.write_text(head + USER_REVISION_BODY)
    return str(made["revision"])


def boot2_restores_everything(run_cli: RunCli, env: dict[str, str]) -> None:
    """Process 3 and on: retrieve, restore, translate every probe as before the kexec, finish."""
    env = {**BOOT2, **env}
    ok(run_cli("session", "retrieve", META["session"], env=env))
    restored = json.loads(ok(run_cli("restore", "--token", META["domain_token"], "--json", env=env)).stdout)
    assert restored["state"] == "restored"
    probes = [t["iova"] for t in META["translations"]]
    now = json.loads(ok(run_cli("translate", str(restored["id"]), *probes, "--json", env=env)).stdout)
    for before, after in zip(META["translations"], now, strict=True):
        assert (after["iova"], after["phys"], after["page_size"], after["writable"]) == (
            before["iova"],
            before["phys"],
            before["page_size"],
            before["writable"],
        )
    assert any(t["phys"] is None for t in now) and any(t["phys"] for t in now)
    new = ok(run_cli("domain", "create", "x86_64", env=env)).stdout.strip()
    ok(run_cli("device", "replace", META["device"], new, "--owner", META["owner"], env=env))
    done = json.loads(ok(run_cli("session", "finish", META["session"], "--json", env=env)).stdout)
    assert done["domains_reclaimed"] == [META["domain_token"]] and done["never_reclaimed"] == []
    assert ok(run_cli("fsck", env=env)).returncode == 0


def check_backup(path: Path, revision: str, rows: dict[str, list[tuple[object, ...]]]) -> None:
    assert path.is_file() and path.name.startswith(f"store.db.bak-{revision}-")
    assert revision_of(path) == revision
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    assert sqlite_dump(path) == rows


def test_upgrade_then_restore_in_the_next_processes(old_db: Path, run_cli: RunCli, tmp_path: Path) -> None:
    before = sqlite_dump(old_db)
    env = {"IOMMUPT_MIGRATIONS": str(tmp_path / "mine")}
    mine = user_revision(run_cli, tmp_path / "mine")
    # process 2: the upgrade, with its backup
    r = ok(run_cli("db", "upgrade", "--json", env=env))
    report = json.loads(r.stdout)
    assert report["from_revision"] == "0006" and report["to_revision"] == mine
    assert report["revisions"][-1] == mine
    assert f"backup: {report['backup']}" in r.stderr
    check_backup(Path(report["backup"]), "0006", before)
    # process 3 on: boot 2
    boot2_restores_everything(run_cli, env)


def test_package_upgrade_alone(old_db: Path, run_cli: RunCli) -> None:
    """Without any revision of the user's: the package's own upgrade (nothing to do while 0006 is its head)."""
    before = sqlite_dump(old_db)
    r = ok(run_cli("db", "upgrade", "--json"))
    report = json.loads(r.stdout)
    assert report["to_revision"] == migrate.SCHEMA_HEAD
    if migrate.SCHEMA_HEAD == "0006":
        assert report["revisions"] == [] and report["backup"] is None and "backup" not in r.stderr
    else:
        check_backup(Path(report["backup"]), "0006", before)
    boot2_restores_everything(run_cli, {})


def test_downgrade_back_to_0006_refuses_loss_and_restores(old_db: Path, run_cli: RunCli, tmp_path: Path) -> None:
    original = sqlite_dump(old_db)
    env = {"IOMMUPT_MIGRATIONS": str(tmp_path / "mine")}
    user_revision(run_cli, tmp_path / "mine")
    ok(run_cli("db", "upgrade", "--no-backup", env=env))
    conn = sqlite3.connect(old_db)
    conn.execute("INSERT INTO lab_note (text) VALUES ('keep me')")
    conn.commit()
    conn.close()
    kept = sqlite_dump(old_db)
    # refused: the note would be lost; nothing changes, no backup
    r = run_cli("db", "downgrade", "0006", env=env)
    assert r.returncode == 1 and "1 lab note(s)" in r.stderr and "--force" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sqlite_dump(old_db) == kept
    assert not list(tmp_path.glob("store.db.bak-*"))
    # lossless once the note is gone: back at 0006 with exactly what the old code wrote
    conn = sqlite3.connect(old_db)
    conn.execute("DELETE FROM lab_note")
    conn.commit()
    conn.close()
    r = ok(run_cli("db", "downgrade", "0006", "--json", env=env))
    assert json.loads(r.stdout)["dropped"] == []
    assert revision_of(old_db) == "0006"
    assert sqlite_dump(old_db) == original
    if migrate.SCHEMA_HEAD == "0006":  # the code of that revision is this one: restore as it would
        boot2_restores_everything(run_cli, {})


def test_forced_downgrade_lists_what_it_dropped(old_db: Path, run_cli: RunCli) -> None:
    ok(run_cli("db", "upgrade"))
    before = sqlite_dump(old_db)
    r = run_cli("db", "downgrade", "0003")
    assert r.returncode == 1 and "1 LUO session(s)" in r.stderr and "1 device(s)" in r.stderr
    assert revision_of(old_db) == migrate.SCHEMA_HEAD
    r = ok(run_cli("db", "downgrade", "0003", "--force", "--json"))
    report = json.loads(r.stdout)
    assert report["to_revision"] == "0003"
    assert any("LUO session" in line for line in report["dropped"])
    assert any("device handover entr" in line for line in report["dropped"])
    check_backup(Path(report["backup"]), migrate.SCHEMA_HEAD, before)
    human = ok(run_cli("db", "upgrade"))
    assert "upgraded" in human.stdout and "backup: " in human.stderr
