"""The command line's edges on PostgreSQL: names printed literally, over-long names refused before the
column would refuse them, an unknown database named, nothing changed by a refusal."""

from __future__ import annotations

import json

from click.testing import CliRunner, Result

from iommupt_store.cli import cli as cli_group
from iommupt_store.errors import EXIT_FAILURE, EXIT_USAGE
from tests.conftest import one_error_line
from tests.test_postgres import pg_url, pytestmark  # noqa: F401 - the per-test database and its skip marks


def pg(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli_group, ["--db", url, *args], catch_exceptions=False)


def _state(url: str, machine: str) -> list[str]:
    listings = (["status", "--json"], ["sessions", "--json"], ["devices", "--json"], ["domains", "--json"])
    return [pg(url, "-m", machine, *args).stdout for args in listings]


def test_names_literal_and_refused_on_postgres(pg_url: str) -> None:  # noqa: F811
    name = "[/x] :bus: [bold]"
    assert pg(pg_url, "-m", name, "init", "--mem", "64M").exit_code == 0
    assert name in pg(pg_url, "status").stdout
    assert pg(pg_url, "-m", name, "session", "create", "é" * 31).exit_code == 0  # 62 bytes
    assert pg(pg_url, "-m", name, "domain", "create", "vtdss").exit_code == 0
    assert pg(pg_url, "-m", name, "device", "attach", "0000:3b:00.1", "1", "--owner", "o" * 64).exit_code == 0
    assert "o" * 64 in pg(pg_url, "-m", name, "devices").stdout
    before = _state(pg_url, name)
    for args, code, says in (
        (["-m", "m" * 65, "init"], EXIT_FAILURE, "1..64 characters"),
        (["-m", name, "session", "create", "é" * 32], EXIT_FAILURE, "1..63 bytes"),
        (["-m", name, "device", "attach", "0000:3b:00.2", "1", "--owner", "o" * 65], EXIT_FAILURE, "1..64"),
        (["-m", name, "map", "99999999999999999999999", "0", "0", "4K"], EXIT_USAGE, "too large"),
        (["-m", name, "restore", "--token", "-1"], EXIT_USAGE, "negative"),
    ):
        r = pg(pg_url, *args)
        assert r.exit_code == code, (args, r.output)
        assert says in one_error_line(r.stderr)
    assert _state(pg_url, name) == before
    assert json.loads(before[2])[0]["owner"] == "o" * 64


def test_unknown_postgres_database_is_named(pg_url: str) -> None:  # noqa: F811
    missing = pg_url.rpartition("/")[0] + "/iommupt_no_such_database"
    r = pg(missing, "status")
    assert r.exit_code == EXIT_FAILURE
    assert "ENOENT" in one_error_line(r.stderr) and "does not exist" in r.stderr
