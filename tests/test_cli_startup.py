"""Start-up: the command line imports a command only when it is used.

``--help`` and ``--version`` must not load the database layer, pydantic, rich or
Alembic (``scripts/bench_startup.py`` measures the time); the lazy table the
root's help is drawn from must agree with the commands themselves.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import click
import pytest

from iommupt_store.cli import COMMAND_TABLE, cli
from tests.conftest import subprocess_env

HEAVY = ("sqlalchemy", "pydantic", "rich", "alembic")
MODULES = ("db_cmds", "domain_cmds", "inspect_cmds", "liveupdate_cmds", "session_cmds")

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
