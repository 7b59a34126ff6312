"""Every command of the command line, fed bad arguments: never a traceback, always one line.

The commands are found by walking the click command tree, so a new command is
covered as soon as it exists: each of its numbers, choices and names gets a
table of bad values (negative, above 2^64 or 2^63, not a number, markup, emoji
codes, control characters, too long ...), and every command gets bad global
options (``--db`` naming a directory, an empty string, an unknown URL scheme,
an unreachable server, a truncated file; a hostile ``--machine``). Each case
must end with the documented exit code and, when it fails, exactly one line on
stderr (never the last-resort "internal error") and a database left exactly
as it was.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from iommupt_store.cli import cli as cli_group
from iommupt_store.cli.common import PROT, Command, Number
from iommupt_store.cli.guard import INTERNAL_ERROR
from iommupt_store.errors import EXIT_DATAERR, EXIT_FAILURE, EXIT_USAGE, InvalidArgument
from iommupt_store.names import check_machine_name
from tests.conftest import RunCli, one_error_line, sqlite_dump

# -- the commands and what a valid call of each looks like -----------------------------------------------


def leaf_commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from leaf_commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


COMMANDS = dict(leaf_commands(cli_group))

#: a valid value for every parameter name a command uses (a new parameter name must be added here)
VALID = {
    "domain_id": "1",
    "iova": "0x0",
    "paddr": "0x0",
    "length": "4K",
    "iovas": "0x0",
    "token": "0x10",
    "bdf": "0000:3b:00.1",
    "name": "s1",
    "session_name": "s1",
    "format": "x86_64",
    "revision": "head",
    "owner": "vm1",
    "did": "1",
    "prot": "rw",
    "top_level": "4",
    "vasz": "48",
    "oasz": "52",
    "features": "SIGN_EXTEND",
    "mem_bytes": "16M",
    "max_children": "4",
    "machine_name": "demo",
    "sql": "SELECT count(*) FROM mapping",
    "image": "mem.raw",  # relative: the cases run in their own temporary directory
    "command": "print(len(list_domains(tx)))",
    "iova_range": "0x0:0x1fffff",
    "message": "add a column",
    "directory": "my-migrations",  # relative, as "image"
    "migrations": "my-migrations",
    "rev_id": "lab01",
    "expect": "runs.json",
    "max_differences": "5",
    "kind": "domain",
    "version": "1",
    "from_profile": "lu-v5",
    "to_profile": "lu-v5",
    "next_profile": "lu-v5",
}

#: bad values by kind of parameter, and the exit code each kind must give
BAD_NUMBERS = [
    "-1",
    "-0x1000",
    "-4K",
    "99999999999999999999999",
    "0x10000000000000000",
    "18446744073709551616",
    "abc",
    "",
    " ",
    "1.5",
    "0x",
    "4X",
    "0x1G",
    "1e9",
]
BAD_CHOICES = ["nope", "", "[/x]", ":bus:", "X86_64 "]
BAD_PROT = ["z", "", "rwq", "R", "r w", "[/x]"]
HOSTILE_TEXT = [
    "[/x]",
    "[bold]x[/bold]",
    ":bus:",
    "",
    " ",
    "a\nb",
    "\x1b[31mred",
    "tab\there",
    "x" * 200,
    "é" * 40,
    "-",
    "\udcff",
]


def _refused_machine_name(name: str) -> bool:
    try:
        check_machine_name(name)
    except InvalidArgument:
        return True
    return False


def _kind(param: click.Parameter) -> str:
    if isinstance(param.type, Number):
        return "number"
    if param.type is PROT:
        return "prot"
    if isinstance(param.type, click.Choice):
        return "choice"
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    return "text"


def _valid_args(cmd: click.Command, skip: str | None = None) -> list[str]:
    """Required arguments and options of ``cmd`` with valid values (all but ``skip``)."""
    args: list[str] = []
    for p in cmd.params:
        if p.name == skip or p.name == "as_json":
            continue
        if isinstance(p, click.Argument):
            args.append(VALID[str(p.name)])
        elif isinstance(p, click.Option) and p.required:
            args += [p.opts[0]] if p.is_flag else [p.opts[0], VALID[str(p.name)]]
    return args


def _with_bad(cmd: click.Command, param: click.Parameter, value: str) -> list[str]:
    """A valid call of ``cmd`` with ``value`` for ``param``, typed as a user would (no ``--``)."""
    args = _valid_args(cmd, skip=param.name)
    if isinstance(param, click.Argument):
        # arguments keep their declared order: put the bad value where this one goes
        position = [p for p in cmd.params if isinstance(p, click.Argument)].index(param)
        return [*args[:position], value, *args[position:]]
    return [*args, param.opts[0], value]


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    #: the exit codes a case may end with (0 only where the bad-looking value is in fact acceptable)
    codes: frozenset[int]
    #: a --db variant, applied by the test (it needs the test's paths)
    db: str | None = None


def _param_cases() -> Iterator[tuple[str, Case]]:
    for path, cmd in COMMANDS.items():
        for param in cmd.params:
            kind = _kind(param)
            if kind == "number":
                bad, codes = BAD_NUMBERS, {EXIT_USAGE}
            elif kind == "prot":
                bad, codes = BAD_PROT, {EXIT_USAGE}
            elif kind == "choice":
                bad, codes = BAD_CHOICES, {EXIT_USAGE}
            elif kind == "text":
                # a name or a revision may be refused (1, 2, 65) or be accepted and shown literally (0)
                bad, codes = HOSTILE_TEXT, {0, EXIT_FAILURE, EXIT_USAGE, EXIT_DATAERR}
                if path == ("demo",):  # a name the rules accept would run the whole demo: only refusals
                    bad = [v for v in bad if _refused_machine_name(v)]
            else:
                continue
            for i, value in enumerate(bad):
                argv = (*path, *_with_bad(cmd, param, value))
                yield f"{'-'.join(path)}-{param.name}-{i}", Case(argv, frozenset(codes))


#: commands that never open the database
NO_DATABASE = {("db", "history"), ("db", "heads"), ("db", "revision"), ("schema",), ("profiles",), ("compat",)}
#: commands that never look at --machine (the demo has its own machine)
IGNORES_MACHINE = {("demo",), ("schema",), ("profiles",), ("compat",)} | {
    ("db", name) for name in ("history", "heads", "revision", "current", "stamp", "upgrade", "downgrade")
}
#: commands that create a missing database
CREATES = {("init",), ("demo",)}
BAD_DBS = {
    "directory": EXIT_FAILURE,
    "empty": EXIT_FAILURE,
    "unknown-scheme": EXIT_FAILURE,
    "malformed-url": EXIT_FAILURE,
    "unreachable-postgresql": EXIT_FAILURE,
    "missing-file": EXIT_FAILURE,
    "missing-directory": EXIT_FAILURE,
    "truncated": EXIT_DATAERR,
    "not-a-database": EXIT_DATAERR,
}
BAD_MACHINES = ["[/x]", ":bus:", "", "a\nb", "x" * 100, "\x1b[2J", "\udcff"]


def _global_cases() -> Iterator[tuple[str, Case]]:
    for path, cmd in COMMANDS.items():
        args = (*path, *_valid_args(cmd))
        for label, code in BAD_DBS.items():
            if path in CREATES and label == "missing-file":
                continue  # creating it is what these commands do
            codes = {0} if path in NO_DATABASE else {code}
            yield f"{'-'.join(path)}-db-{label}", Case(args, frozenset(codes), db=label)
        for i, name in enumerate(BAD_MACHINES if path not in IGNORES_MACHINE else []):
            # an unknown machine is ENOENT, bytes that are not UTF-8 a usage error; init refuses a bad name
            # or creates a good one (shown literally)
            yield f"{'-'.join(path)}-machine-{i}", Case(("-m", name, *args), frozenset({0, EXIT_FAILURE, EXIT_USAGE}))


CASES = dict(_param_cases()) | dict(_global_cases())


# -- the world the cases run against ---------------------------------------------------------------------


def _invoke(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli_group, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with a little of everything: two domains, a mapping, a device, a session, a preserved domain."""
    db = tmp_path_factory.mktemp("bad-args") / "template.db"
    for args in (
        ["init", "--mem", "64M"],
        ["domain", "create", "x86_64"],
        ["map", "1", "0x0", "0x0", "2M"],
        ["domain", "create", "vtdss"],
        ["device", "attach", "0000:3b:00.1", "2", "--owner", "vm1"],
        ["session", "create", "s1"],
        ["preserve", "2", "--token", "0x10", "--session", "s1"],
    ):
        code, out, err = _invoke("--db", str(db), *args)
        assert code == 0, (args, out, err)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


def _db_argument(label: str, tmp_path: Path, template: Path) -> str:
    if label == "directory":
        return str(tmp_path)
    if label == "empty":
        return ""
    if label == "unknown-scheme":
        return "foo://x"
    if label == "malformed-url":
        return "postgresql+psycopg://u@[::1/x"
    if label == "unreachable-postgresql":
        return "postgresql+psycopg://u@127.0.0.1:1/x"
    if label == "missing-file":
        return str(tmp_path / "missing.db")
    if label == "missing-directory":
        return str(tmp_path / "no" / "such" / "dir.db")
    damaged = tmp_path / f"{label}.db"
    if label == "truncated":
        damaged.write_bytes(template.read_bytes()[:5000])
    else:
        damaged.write_bytes(b"these are not the droids you are looking for\n" * 200)
    return str(damaged)


def _files(tmp_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_argument(case: Case, tmp_path: Path, template: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # files a command writes (export-image) land here
    db = tmp_path / "store.db"
    shutil.copyfile(template, db)
    target = str(db) if case.db is None else _db_argument(case.db, tmp_path, template)
    before_rows = sqlite_dump(db)
    before_files = _files(tmp_path)
    code, out, err = _invoke("--db", target, *case.argv)
    assert "Traceback" not in out + err
    assert code in case.codes, (code, out, err)
    if code != 0:
        line = one_error_line(err)
        assert line.startswith("error: "), line
        assert INTERNAL_ERROR not in line, line
        assert sqlite_dump(db) == before_rows
        if case.db is not None:
            assert _files(tmp_path) == before_files  # no file created, none touched


def test_the_walk_covers_every_command_and_parameter() -> None:
    """A parameter name the table does not know fails here, not silently in the matrix."""
    assert len(COMMANDS) >= 30
    for path, cmd in COMMANDS.items():
        assert isinstance(cmd, Command), f"{' '.join(path)} must use the CLI's Command class"
        for p in cmd.params:
            if p.name != "as_json" and _kind(p) != "flag":
                assert p.name in VALID, f"add a valid value for {p.name!r} of {' '.join(path)}"
    assert sum(1 for c in CASES.values() if c.codes == {EXIT_USAGE}) > 200


@pytest.mark.parametrize("path", list(COMMANDS), ids=["-".join(p) for p in COMMANDS])
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    code, out, err = _invoke(*path, "--help")
    assert (code, err) == (0, "")
    assert f"Usage: iommupt-store {' '.join(path)}" in " ".join(out.split())


# -- the issue's own examples, through the real entry point ------------------------------------------------


@pytest.fixture
def world(run_cli: RunCli, db_path: Path, template: Path) -> Path:
    shutil.copyfile(template, db_path)
    return db_path


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["map", "99999999999999999999999", "0", "0", "4K"], EXIT_USAGE, "too large"),
        (["map", "1", "-0x1000", "0", "4K"], EXIT_USAGE, "negative"),
        (["map", "1", "0x0", "0x0", "4K", "--prot", "rz"], EXIT_USAGE, "unknown permission letter"),
        (["restore", "--token", "-1"], EXIT_USAGE, "negative"),
        (["restore", "--token", "0x10000000000000000"], EXIT_USAGE, "too large"),
        (["device", "attach", "0000:3b:00.2", "1", "--owner", "o" * 65], EXIT_FAILURE, "1..64 characters"),
        (["session", "create", "s" * 64], EXIT_FAILURE, "1..63 bytes"),
        (["--db", "", "status"], EXIT_FAILURE, "empty"),
        (["--db", "foo://x", "status"], EXIT_FAILURE, "unknown database URL scheme 'foo'"),
        (["--db", "postgresql+psycopg://u@127.0.0.1:1/x", "status"], EXIT_FAILURE, "ECONNREFUSED"),
        (["--db", "missing.db", "db", "upgrade"], EXIT_FAILURE, "iommupt-store init"),
        (["nosuchcommand"], EXIT_USAGE, "No such command"),
    ],
)
def test_real_process(world: Path, run_cli: RunCli, args: list[str], code: int, says: str) -> None:
    before = sqlite_dump(world)
    r = run_cli(*args)
    assert r.returncode == code, r.stderr
    assert says in one_error_line(r.stderr)
    assert r.stdout == ""
    assert sqlite_dump(world) == before
    assert not (world.parent / "missing.db").exists()


def test_real_process_directory_and_truncated_file(run_cli: RunCli, tmp_path: Path, template: Path) -> None:
    r = run_cli("status", db=tmp_path)
    assert (r.returncode, r.stdout) == (EXIT_FAILURE, "")
    assert "EISDIR" in one_error_line(r.stderr)
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(template.read_bytes()[:5000])
    for args in (["status"], ["init"], ["domains"], ["db", "upgrade"], ["fsck"]):
        r = run_cli(*args, db=truncated)
        assert (r.returncode, r.stdout) == (EXIT_DATAERR, ""), (args, r.stderr)
        assert "not an SQLite database, or a damaged one" in one_error_line(r.stderr)
    assert truncated.read_bytes() == template.read_bytes()[:5000]


def test_read_only_database(run_cli: RunCli, tmp_path: Path, template: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("file permissions do not bind root")
    ro = tmp_path / "ro"
    ro.mkdir()
    db = ro / "store.db"
    shutil.copyfile(template, db)
    db.chmod(0o444)
    ro.chmod(0o555)
    try:
        r = run_cli("domain", "create", "x86_64", db=db)
        assert r.returncode == EXIT_FAILURE
        assert "read-only" in one_error_line(r.stderr) or "cannot open" in r.stderr
    finally:
        ro.chmod(0o755)
