"""Start-up: the command line imports a command only when it is used.

``--help`` and ``--version`` must not load the database layer, pydantic, rich or
Alembic; ``status`` must not load the ORM models, Alembic or (but for
``--json``) pydantic, and on a local SQLite file not even SQLAlchemy
(``scripts/bench_startup.py`` measures the time). The lazy table the root's help
is drawn from must agree with the commands themselves.
"""

from __future__ import annotations

import importlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import click
import pytest

from iommupt_store.cli import COMMAND_TABLE, cli
from tests.conftest import RunCli, subprocess_env
from tests.test_postgres import PG_URL, fresh_pg_database

HEAVY = ("sqlalchemy", "pydantic", "rich", "alembic")
MODULES = ("db_cmds", "domain_cmds", "inspect_cmds", "liveupdate_cmds", "session_cmds", "status_cmd")
#: what ``status`` never needs: the ORM (and the models built on it) and Alembic
NOT_FOR_STATUS = ("sqlalchemy.orm", "alembic", "iommupt_store.db.models")

CHECK = """
import json, sys
from iommupt_store.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
loaded = sorted({m.split(".")[0] for m in sys.modules} & %r)
print(json.dumps(loaded), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["-h"]])
def test_help_and_version_load_no_heavy_module(argv: list[str]) -> None:
    code = CHECK % (set(HEAVY),)
    r = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=subprocess_env(), timeout=60
    )
    assert json.loads(r.stderr.strip().splitlines()[-1]) == [], r.stderr


def test_root_help_lists_every_command_with_its_own_short_help() -> None:
    ctx = click.Context(cli)
    for name, (module, attr, line) in COMMAND_TABLE.items():
        cmd = getattr(importlib.import_module(f"iommupt_store.cli.{module}"), attr)
        assert cmd.name == name, f"COMMAND_TABLE[{name!r}] points at the command {cmd.name!r}"
        for limit in (40, 60, 80, 1000):
            assert click.Command(name, help=line).get_short_help_str(limit) == cmd.get_short_help_str(limit), (
                f"COMMAND_TABLE[{name!r}]: update its line to {cmd.get_short_help_str(1000)!r}"
            )
        assert cli.get_command(ctx, name) is cmd


def test_every_command_of_the_modules_is_in_the_table() -> None:
    """A command added to a module's COMMANDS (or to db_cmds) needs its row in COMMAND_TABLE."""
    found = set()
    for module in MODULES:
        mod = importlib.import_module(f"iommupt_store.cli.{module}")
        for value in vars(mod).values():
            if isinstance(value, click.Command) and not isinstance(getattr(value, "parent", None), click.Group):
                found.add((value.name, module))
    top_level = {(name, module) for name, (module, _, _) in COMMAND_TABLE.items()}
    sub = {name for g in cli.commands.values() if isinstance(g, click.Group) for name in g.commands}
    missing = {(n, m) for n, m in found - top_level if n not in sub}
    assert not missing, f"commands missing from COMMAND_TABLE: {sorted(missing)}"


def test_help_shows_the_table_lines() -> None:
    from click.testing import CliRunner

    out = CliRunner().invoke(cli, ["--help"], catch_exceptions=False).stdout
    for name in COMMAND_TABLE:
        assert f"\n  {name} " in out


LOADED = """
import json, sys
from iommupt_store.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def loaded_by(*argv: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """The modules a command's process imported (and the process), the command run in a child."""
    r = subprocess.run(
        [sys.executable, "-c", LOADED, *argv], capture_output=True, text=True, env=subprocess_env(), timeout=60
    )
    last = json.loads(r.stderr.strip().splitlines()[-1])
    assert last["code"] == 0, r.stderr
    return set(last["modules"]), r


def _under(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.fixture
def sqlite_store(tmp_path: Path, run_cli: RunCli) -> Path:
    db = tmp_path / "s.db"
    assert run_cli("init", "--mem", "64M", db=db).returncode == 0
    assert run_cli("-m", "other", "init", "--mem", "32M", db=db).returncode == 0
    return db


def test_status_of_an_sqlite_file_loads_neither_sqlalchemy_nor_pydantic(sqlite_store: Path) -> None:
    modules, r = loaded_by("--db", str(sqlite_store), "status")
    assert _under(modules, ("sqlalchemy", "pydantic", *NOT_FOR_STATUS)) == []
    assert "default" in r.stdout and "other" in r.stdout
    modules, r = loaded_by("--db", str(sqlite_store), "-m", "other", "status", "--json")
    assert _under(modules, ("sqlalchemy", *NOT_FOR_STATUS)) == []
    assert [m["name"] for m in json.loads(r.stdout)["machines"]] == ["other"]


def test_status_through_sqlalchemy_loads_core_only(sqlite_store: Path) -> None:
    modules, r = loaded_by("--db", f"sqlite:///{sqlite_store}", "status")
    assert "sqlalchemy" in modules
    assert _under(modules, ("pydantic", *NOT_FOR_STATUS)) == []
    assert "other" in r.stdout


def test_status_reads_alike_both_ways_and_writes_nothing(sqlite_store: Path, run_cli: RunCli) -> None:
    """The sqlite3 read (a bare path) and the SQLAlchemy one (a URL) give the same report."""
    before = sqlite_store.read_bytes()
    for args in (("status",), ("status", "--json"), ("-m", "other", "status", "--json")):
        fast = run_cli(*args, db=sqlite_store)
        full = run_cli(*args, db=f"sqlite:///{sqlite_store}")
        assert fast.returncode == full.returncode == 0, (fast.stderr, full.stderr)
        assert fast.stdout == full.stdout
    assert sqlite_store.read_bytes() == before


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE boot SET started_at = 'garbage'",
        "UPDATE boot SET started_at = '2026-01-01T00:00:00+00:00'",
        "UPDATE boot SET started_at = '2026-13-45 00:00:00'",
        "UPDATE machine SET mem_bytes = 'lots'",
        "UPDATE boot SET kernel_profile = x'05'",
        "UPDATE alembic_version SET version_num = '0006'",
        "DROP TABLE alembic_version",
    ],
)
def test_status_of_an_unusual_store_answers_as_the_full_path(sqlite_store: Path, run_cli: RunCli, tamper: str) -> None:
    """Whatever the sqlite3 read does not expect, the usual path answers: the same output, error and code."""
    with sqlite3.connect(sqlite_store) as conn:
        conn.execute(tamper)
    conn.close()
    for args in (("status",), ("status", "--json")):
        fast = run_cli(*args, db=sqlite_store)
        full = run_cli(*args, db=f"sqlite:///{sqlite_store}")
        assert (fast.returncode, fast.stdout, fast.stderr) == (full.returncode, full.stdout, full.stderr)
        assert "Traceback" not in fast.stderr


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="IOMMUPT_TEST_PG_URL is not set")
def test_status_on_postgres_loads_core_only(run_cli: RunCli) -> None:
    with fresh_pg_database() as url:
        assert run_cli("init", "--mem", "64M", db=url).returncode == 0
        modules, r = loaded_by("--db", url, "status")
        assert _under(modules, ("pydantic", *NOT_FOR_STATUS)) == []
        assert "default" in r.stdout
