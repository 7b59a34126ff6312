"""What the command line prints: results on stdout, diagnostics on stderr, user text literally.

Also the small rules behind it: one number parser (CLI and pytest plugin), the
name rules checked where names are first written, the kernel's errno names.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from iommupt_store.errors import EXIT_FAILURE, EXIT_USAGE, InvalidArgument, NotSupported, errno_name
from iommupt_store.names import check_machine_name, check_owner, check_session_name
from iommupt_store.testing import _parse_size
from iommupt_store.units import U64_MAX, format_size, parse_number
from tests.conftest import InvokeCli, RunCli, one_error_line, sqlite_dump

#: names that rich would read as markup, emoji codes or a style, and plain but unusual ones
HOSTILE_NAMES = ["[/x]", "[bold]b[/bold]", ":bus:", "[red]r", "x]", "\\[", "a b", "é" * 20, "%s{0}", "<script>"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_printed_exactly_as_typed(cli: InvokeCli, name: str) -> None:
    r = cli("-m", name, "init", "--mem", "16M")
    assert r.exit_code == 0, r.output
    assert f"machine {name!r} created" in r.stdout
    assert name in cli("status").stdout
    assert name in cli("-m", name, "status").stdout
    assert cli("-m", name, "session", "create", name).exit_code == 0
    assert name in cli("-m", name, "sessions").stdout
    assert cli("-m", name, "domain", "create", "vtdss").exit_code == 0
    assert cli("-m", name, "device", "attach", "0000:3b:00.1", "1", "--owner", name).exit_code == 0
    assert name in cli("-m", name, "devices").stdout
    assert json.loads(cli("-m", name, "devices", "--json").stdout)[0]["owner"] == name
    missing = cli("-m", name + "-missing", "status")
    assert missing.exit_code == EXIT_FAILURE
    assert repr(name + "-missing") in one_error_line(missing.stderr)


def test_init_with_markup_in_the_name_either_refuses_or_succeeds_and_prints_it(cli: InvokeCli, db_path: Path) -> None:
    """The case from the issue: the machine is committed, so printing it must not fail (it does not)."""
    r = cli("-m", "[/x]", "init", "--mem", "16M")
    assert (r.exit_code, r.stderr) == (0, "")
    assert r.stdout.startswith("machine '[/x]' created 16 MiB, boot 1")
    assert [row[1] for row in sqlite_dump(db_path)["machine"]] == ["[/x]"]


def test_control_characters_stored_by_hand_are_shown_escaped(cli: InvokeCli, db_path: Path) -> None:
    """A name written behind the store's back (plain SQL) cannot drive the terminal or break a listing."""
    import sqlite3

    cli("init", "--mem", "16M")
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE machine SET name = ? WHERE name = 'default'", ("evil\x1b[2J\nname",))
    conn.commit()
    conn.close()
    r = cli("status")
    assert r.exit_code == 0
    assert "\x1b" not in r.stdout
    assert "evil\\x1b[2J\\nname" in r.stdout


def test_a_terminal_that_cannot_show_a_name_gets_escapes(run_cli: RunCli, db_path: Path) -> None:
    ascii_only = {"PYTHONIOENCODING": "ascii"}
    r = run_cli("-m", "café ☕", "init", "--mem", "16M", env=ascii_only)
    assert r.returncode == 0, r.stderr
    assert [row[1] for row in sqlite_dump(db_path)["machine"]] == ["café ☕"]
    for args in (["status"], ["-m", "café ☕", "session", "create", "s☕"], ["-m", "café ☕", "sessions"]):
        r = run_cli(*args, env=ascii_only)
        assert r.returncode == 0, (args, r.stderr)
        assert "☕" in r.stdout or "\\u2615" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "x" * 65, "init"], "1..64 characters"),
        (["-m", "a\nb", "init"], "control character"),
        (["-m", " lead", "init"], "space"),
        (["-m", "", "init"], "1..64 characters"),
        (["init", "--mem", "1M"], "between 2 MiB and 4 PiB"),
    ],
)
def test_init_refuses_before_creating_anything(cli: InvokeCli, db_path: Path, args: list[str], message: str) -> None:
    r = cli(*args)
    assert r.exit_code == EXIT_FAILURE
    assert message in one_error_line(r.stderr)
    assert not db_path.exists()


def test_init_says_it_does_not_resize(cli: InvokeCli) -> None:
    cli("init", "--mem", "4G")
    r = cli("init", "--mem", "8G")
    assert r.exit_code == 0
    assert "already exists: 4096 MiB" in r.stdout
    assert "keeps its 4G" in r.stderr and "--mem 8G ignored" in r.stderr
    doc = json.loads(cli("init", "--mem", "8G", "--json").stdout)
    assert (doc["mem_bytes"], doc["mem_bytes_ignored"]) == (4 << 30, 8 << 30)
    quiet = cli("init")  # no --mem: nothing to report
    assert quiet.stderr == ""
    assert json.loads(cli("init", "--json").stdout)["mem_bytes_ignored"] is None


def test_results_on_stdout_diagnostics_on_stderr(cli: InvokeCli) -> None:
    cli("init", "--mem", "64M")
    created = cli("domain", "create", "x86_64")
    assert created.stdout == "1\n"
    assert "x86_64" in created.stderr
    assert cli("map", "1", "0x0", "0x0", "2M").stdout.startswith("mapped 2M at 0x0")
    unmapped = cli("unmap", "1", "0x0", "4K")
    assert (unmapped.stdout, unmapped.stderr) == ("0x200000\n", "")
    for args in (["status"], ["domains"], ["show", "1"], ["sessions"], ["devices"], ["handover"], ["fsck"]):
        r = cli(*args)
        assert r.exit_code == 0, (args, r.output)
        assert r.stdout and r.stderr == "", args


def test_json_is_never_wrapped(run_cli: RunCli) -> None:
    """Real processes in narrow terminals: JSON is plain text, a piped table is never folded."""
    long_name = "m" * 64
    assert run_cli("-m", long_name, "init", "--mem", "64M").returncode == 0
    assert run_cli("-m", long_name, "domain", "create", "riscv").returncode == 0
    r = run_cli("-m", long_name, "preserve", "1", "--token", "0xffffffffffffffff", "--json", env={"COLUMNS": "60"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["descriptor"]["format"] == "riscv"
    r = run_cli("-m", long_name, "handover", "--json", env={"COLUMNS": "120"})
    assert json.loads(r.stdout)["outgoing"][0]["token"] == "0xffffffffffffffff"
    assert long_name in run_cli("status", env={"COLUMNS": "60"}).stdout


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("0x1000", 4096),
        ("0X1000", 4096),
        ("4K", 4096),
        ("4k", 4096),
        ("4KB", 4096),
        ("4KiB", 4096),
        ("4G", 4 << 30),
        ("4GB", 4 << 30),
        ("4GiB", 4 << 30),
        ("4 G", 4 << 30),
        ("1_000", 1000),
        ("15E", 15 << 60),
        ("0xffffffffffffffff", U64_MAX),
    ],
)
def test_one_number_parser(text: str, value: int) -> None:
    assert parse_number(text) == value
    assert _parse_size(text) == value  # the pytest plugin's iommupt_mem / mark(mem=...)


@pytest.mark.parametrize("text", ["", "-1", "-4K", "4X", "0x1G", "1.5G", "abc", "0x", "0x10000000000000000", "16E"])
def test_number_parser_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_number(text)
    with pytest.raises(pytest.UsageError, match="iommupt: bad memory size"):
        _parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (4096, 2 << 20, 1 << 30, 3 << 12, 0x1234)] == ["4K", "2M", "1G", "12K", "0x1234"]


def test_did_takes_hex_and_prot_refuses_unknown_letters(cli: InvokeCli) -> None:
    cli("init", "--mem", "64M")
    cli("domain", "create", "vtdss")
    r = cli("device", "attach", "0000:3b:00.1", "1", "--did", "0x2a", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["did"] == 42
    for prot in ("rz", "R", "", "rw!"):
        bad = cli("map", "1", "0x0", "0x0", "4K", "--prot", prot)
        assert bad.exit_code == EXIT_USAGE
        assert "permission letter" in one_error_line(bad.stderr)
    assert cli("map", "1", "0x0", "0x0", "4K", "--prot", "rwx").exit_code == 0


def test_errno_names_are_the_kernels() -> None:
    assert errno_name(errno.EOPNOTSUPP) == "EOPNOTSUPP"
    assert errno_name(errno.EAGAIN) == "EAGAIN"
    assert NotSupported("x").errno_name == "EOPNOTSUPP"
    assert str(NotSupported("no")) == "EOPNOTSUPP: no"


def test_owner_message_never_says_none(cli: InvokeCli) -> None:
    cli("init", "--mem", "64M")
    cli("domain", "create", "vtdss")
    cli("device", "attach", "0000:3b:00.1", "1", "--owner", "vm1")
    r = cli("device", "detach", "0000:3b:00.1")
    assert r.exit_code == EXIT_FAILURE
    line = one_error_line(r.stderr)
    assert "None" not in line and "no owner" in line


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (check_machine_name, ["a", "x" * 64, "[/x]", "é" * 64], ["", "x" * 65, "a\tb", "a\x00", " a", "\udcff"]),
        (check_session_name, ["s", "x" * 63, "é" * 31], ["", "x" * 64, "é" * 32, "new\nline", "\udcff"]),
        (check_owner, ["vfio-vm1", "o" * 64], ["", "o" * 65, "o\x7f", "o "]),
    ],
)
def test_name_rules(check: object, good: list[str], bad: list[str]) -> None:
    assert callable(check)
    for name in good:
        assert check(name) == name
    for name in bad:
        with pytest.raises(InvalidArgument):
            check(name)
