"""The command line of the foundation: init, status, db ..., options, exit codes, bad input.

In-process tests use click's CliRunner; the bad-input matrix runs the real
``python -m iommupt_store`` so that exit codes and stderr are what a shell sees.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from iommupt_store import Store
from iommupt_store.cli import EPILOG
from iommupt_store.db import migrate
from iommupt_store.errors import EXIT_DATAERR, EXIT_FAILURE, EXIT_TEMPFAIL, EXIT_USAGE
from tests.conftest import InvokeCli, RunCli, one_error_line, sqlite_dump

# -- in-process (CliRunner) -----------------------------------------------------------------------------------


def test_init_creates_store_machine_and_boot(cli: InvokeCli, db_path: Path) -> None:
    r = cli("init", "--mem", "16M")
    assert r.exit_code == 0, r.output
    assert r.stderr == ""
    assert "machine 'default' created 16 MiB, boot 1" in r.stdout
    assert db_path.is_file()
    assert sqlite_dump(db_path)["machine"][0][1:3] == ("default", 16 << 20)


def test_init_json_and_idempotence(cli: InvokeCli) -> None:
    first = json.loads(cli("-m", "host1", "init", "--mem", "0x1000000", "--json").stdout)
    assert first["machine"] == "host1"
    assert first["created"] is True
    assert (first["boot"], first["mem_bytes"]) == (1, 16 << 20)
    again = json.loads(cli("-m", "host1", "init", "--mem", "32M", "--json").stdout)
    assert again["created"] is False
    assert (again["boot"], again["mem_bytes"]) == (1, 16 << 20)  # the existing machine is kept


def test_status_json_shows_machines_boots_pages(cli: InvokeCli, db_path: Path) -> None:
    cli("-m", "a", "init", "--mem", "8M")
    cli("-m", "b", "init", "--mem", "4M")
    with Store(db_path) as s:
        m = s.machine("a")
        with m.transaction() as tx:
            tx.memory.alloc("test")
            tx.memory.alloc("test", order=1)
        s.machine("b").reboot(cold=True)
    r = cli("status", "--json")
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["revision"] == migrate.head_revision()
    assert st["url"].endswith("store.db")
    by_name = {m["name"]: m for m in st["machines"]}
    assert set(by_name) == {"a", "b"}
    assert by_name["a"]["mem_bytes"] == 8 << 20
    assert by_name["a"]["pages_allocated"] == 3
    assert by_name["a"]["bytes_allocated"] == 3 * 4096
    assert [(b["number"], b["end_kind"]) for b in by_name["a"]["boots"]] == [(1, None)]
    assert [(b["number"], b["end_kind"]) for b in by_name["b"]["boots"]] == [(1, "cold")]
    assert by_name["b"]["pages_allocated"] == 0


def test_status_table_goes_to_stdout(cli: InvokeCli) -> None:
    cli("init", "--mem", "4M")
    r = cli("status")
    assert r.exit_code == 0
    assert r.stderr == ""
    assert "default" in r.stdout and "running" in r.stdout


def test_status_of_one_machine(cli: InvokeCli) -> None:
    cli("-m", "a", "init", "--mem", "4M")
    cli("-m", "b", "init", "--mem", "4M")
    st = json.loads(cli("-m", "b", "status", "--json").stdout)
    assert [m["name"] for m in st["machines"]] == ["b"]
    r = cli("-m", "zzz", "status")
    assert r.exit_code == EXIT_FAILURE
    assert "no machine named 'zzz'" in r.stderr and "a, b" in r.stderr


def test_db_and_machine_from_environment(cli: InvokeCli, tmp_path: Path) -> None:
    target = tmp_path / "env.db"
    r = cli("init", "--mem", "4M", db=None, env={"IOMMUPT_DB": str(target), "IOMMUPT_MACHINE": "envm"})
    assert r.exit_code == 0, r.output
    assert target.is_file()
    assert [m[1] for m in sqlite_dump(target)["machine"]] == ["envm"]
    # --db wins over $IOMMUPT_DB
    r = cli("status", "--json", env={"IOMMUPT_DB": str(tmp_path / "elsewhere.db")})
    assert r.exit_code == EXIT_FAILURE  # the fixture's db_path was never initialised
    assert not (tmp_path / "elsewhere.db").exists()


def test_db_current_history_upgrade(cli: InvokeCli) -> None:
    cli("init", "--mem", "4M")
    cur = json.loads(cli("db", "current", "--json").stdout)
    assert cur["current"] == cur["head"] == migrate.head_revision()
    assert cur["up_to_date"] is True
    hist = json.loads(cli("db", "history", "--json").stdout)
    assert hist[-1]["revision"] == migrate.head_revision()
    assert hist[0]["down_revision"] is None
    r = cli("db", "upgrade")
    assert r.exit_code == 0 and "already at" in r.stdout
    human = cli("db", "history")
    assert migrate.head_revision() in human.stdout


def test_db_downgrade_then_commands_say_what_to_run(cli: InvokeCli) -> None:
    cli("init", "--mem", "4M")
    r = cli("db", "downgrade", "-1")
    assert r.exit_code == 0, r.output
    cur = json.loads(cli("db", "current", "--json").stdout)
    assert cur["up_to_date"] is False and cur["newer"] is False
    r = cli("status")
    assert r.exit_code == EXIT_DATAERR
    assert "iommupt-store db upgrade" in r.stderr or "iommupt-store init" in r.stderr
    assert cli("db", "upgrade").exit_code == 0
    assert cli("status", "--json").exit_code == 0


def test_unknown_revision_argument(cli: InvokeCli) -> None:
    cli("init", "--mem", "4M")
    r = cli("db", "upgrade", "no-such-revision")
    assert r.exit_code == EXIT_FAILURE
    assert "no-such-revision" in one_error_line(r.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ("bogus-command",),
        ("init", "--mem", "lots"),
        ("init", "--no-such-option"),
        ("db",),
        ("db", "downgrade"),
    ],
)
def test_usage_errors_exit_2(cli: InvokeCli, db_path: Path, args: tuple[str, ...]) -> None:
    r = cli(*args)
    assert r.exit_code == EXIT_USAGE, r.output
    assert r.stdout == ""
    assert not db_path.exists()


def test_bad_memory_size_is_a_failure_not_a_crash(cli: InvokeCli) -> None:
    r = cli("init", "--mem", "1M")
    assert r.exit_code == EXIT_FAILURE
    assert "EINVAL" in one_error_line(r.stderr)


def test_help_documents_exit_codes(cli: InvokeCli) -> None:
    r = cli("--help")
    assert r.exit_code == 0
    for code in ("0", "1", "2", "65", "75"):
        assert re.search(rf"^\s+{code}\s+\w", r.stdout, re.MULTILINE), code
    assert "IOMMUPT_DB" in EPILOG


def test_locked_database_exits_75(cli: InvokeCli, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iommupt_store.db import engine

    cli("init", "--mem", "4M")
    monkeypatch.setattr(engine, "BUSY_TIMEOUT_MS", 200)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        before = sqlite_dump(db_path)
        r = cli("-m", "other", "init", "--mem", "4M")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.exit_code == EXIT_TEMPFAIL, r.output
    assert "locked" in one_error_line(r.stderr)
    assert sqlite_dump(db_path) == before


# -- real processes -------------------------------------------------------------------------------------------


def test_cli_in_a_subprocess(run_cli: RunCli, db_path: Path) -> None:
    r = run_cli("init", "--mem", "8M", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["created"] is True
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["machines"][0]["boots"][0]["number"] == 1


def test_default_database_is_in_the_working_directory(run_cli: RunCli, tmp_path: Path) -> None:
    r = run_cli("init", "--mem", "4M", db=None)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "iommupt.db").is_file()


def _stamp(path: Path, revision: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    conn.commit()
    conn.close()


def _older(path: Path) -> None:
    """Take a current store one revision back (to base while there is only one)."""
    head = migrate.head_revision()
    down = next(r["down_revision"] for r in migrate.history() if r["revision"] == head)
    migrate.downgrade(f"sqlite:///{path}", down or "base")


Setup = Callable[[Path], None]


def _junk(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 300)


def _newer(path: Path) -> None:
    _stamp(path, "ffffffffffff")


def _foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x TEXT)")
    conn.execute("INSERT INTO notes VALUES ('mine')")
    conn.commit()
    conn.close()


BAD_INPUT = [
    pytest.param(_junk, False, ("status",), EXIT_DATAERR, "not an SQLite database", id="junk-status"),
    pytest.param(_junk, False, ("init",), EXIT_DATAERR, "not an SQLite database", id="junk-init"),
    pytest.param(_junk, False, ("db", "upgrade"), EXIT_DATAERR, "not an SQLite database", id="junk-upgrade"),
    pytest.param(_junk, False, ("db", "current"), EXIT_DATAERR, "not an SQLite database", id="junk-current"),
    pytest.param(_foreign, False, ("init",), EXIT_DATAERR, "not an iommupt-store database", id="foreign-init"),
    pytest.param(_foreign, False, ("status",), EXIT_DATAERR, "not an iommupt-store database", id="foreign"),
    pytest.param(_newer, True, ("status",), EXIT_DATAERR, "newer iommupt-store", id="newer-status"),
    pytest.param(_newer, True, ("init",), EXIT_DATAERR, "newer iommupt-store", id="newer-init"),
    pytest.param(_newer, True, ("db", "upgrade"), EXIT_DATAERR, "newer iommupt-store", id="newer-upgrade"),
    pytest.param(_newer, True, ("db", "downgrade", "base"), EXIT_DATAERR, "newer iommupt-store", id="newer-downgrade"),
    pytest.param(_older, True, ("status",), EXIT_DATAERR, "iommupt-store ", id="older-status"),
    pytest.param(_older, True, ("-m", "x", "status"), EXIT_DATAERR, "iommupt-store ", id="older-machine"),
    pytest.param(None, True, ("-m", "nope", "status"), EXIT_FAILURE, "no machine named 'nope'", id="machine"),
]
#: the same cases through a real process (slower: about half a second each)
BAD_INPUT_SUBPROCESS = [p for p in BAD_INPUT if p.id in ("junk-status", "newer-init", "older-status", "machine")]

Invoke = Callable[..., tuple[int, str, str]]


def _check_bad_input(
    invoke: Invoke,
    db_path: Path,
    setup: Setup | None,
    init_first: bool,
    args: tuple[str, ...],
    code: int,
    words: str,
) -> None:
    if init_first:
        with Store.init(db_path) as s:
            s.create_machine("default", 4 << 20)
            s.machine("default")
    if setup is not None:
        setup(db_path)
    before = db_path.read_bytes()
    dump = None if setup is _junk else sqlite_dump(db_path)
    siblings = sorted(p.name for p in db_path.parent.iterdir())
    rc, stdout, stderr = invoke(*args)
    assert rc == code, (stdout, stderr)
    line = one_error_line(stderr)
    assert line.startswith("error: ")
    assert words in line
    if setup is _older:
        assert "iommupt-store db upgrade" in line or "iommupt-store init" in line
    assert "Traceback" not in stderr
    assert stdout == ""
    assert db_path.read_bytes() == before
    if dump is not None:
        assert sqlite_dump(db_path) == dump
    assert sorted(p.name for p in db_path.parent.iterdir()) == siblings


@pytest.mark.parametrize(("setup", "init_first", "args", "code", "words"), BAD_INPUT)
def test_bad_input_one_line_exit_code_nothing_changed(
    cli: InvokeCli,
    db_path: Path,
    setup: Setup | None,
    init_first: bool,
    args: tuple[str, ...],
    code: int,
    words: str,
) -> None:
    def invoke(*argv: str) -> tuple[int, str, str]:
        r = cli(*argv)
        return r.exit_code, r.stdout, r.stderr

    _check_bad_input(invoke, db_path, setup, init_first, args, code, words)


@pytest.mark.parametrize(("setup", "init_first", "args", "code", "words"), BAD_INPUT_SUBPROCESS)
def test_bad_input_in_a_real_process(
    run_cli: RunCli,
    db_path: Path,
    setup: Setup | None,
    init_first: bool,
    args: tuple[str, ...],
    code: int,
    words: str,
) -> None:
    def invoke(*argv: str) -> tuple[int, str, str]:
        r = run_cli(*argv)
        return r.returncode, r.stdout, r.stderr

    _check_bad_input(invoke, db_path, setup, init_first, args, code, words)


@pytest.mark.parametrize("args", [("init",), ("status",), ("db", "upgrade"), ("db", "current")])
def test_missing_directory_creates_nothing(cli: InvokeCli, tmp_path: Path, args: tuple[str, ...]) -> None:
    target = tmp_path / "no" / "such" / "dir" / "x.db"
    r = cli(*args, db=target)
    assert r.exit_code == EXIT_FAILURE, r.output
    line = one_error_line(r.stderr)
    assert "ENOENT" in line and "does not exist" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [("status",), ("db", "current"), ("db", "downgrade", "base"), ("-m", "m", "status")])
def test_missing_file_is_not_created(cli: InvokeCli, tmp_path: Path, args: tuple[str, ...]) -> None:
    target = tmp_path / "absent.db"
    r = cli(*args, db=target)
    assert r.exit_code == EXIT_FAILURE, r.output
    assert "iommupt-store init" in one_error_line(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_or_file_in_a_real_process(run_cli: RunCli, tmp_path: Path) -> None:
    r = run_cli("init", db=tmp_path / "no" / "x.db")
    assert r.returncode == EXIT_FAILURE
    assert "does not exist" in one_error_line(r.stderr)
    r = run_cli("status", db=tmp_path / "absent.db")
    assert r.returncode == EXIT_FAILURE
    assert "iommupt-store init" in one_error_line(r.stderr)
    assert list(tmp_path.iterdir()) == []
