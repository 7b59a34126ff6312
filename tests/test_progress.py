"""Progress bars: on stderr, only on a terminal, never with ``--quiet``.

The command runs in a child whose stderr is a pseudo-terminal (``pty``) or a
pipe, with the one-second delay before a bar appears set to zero, so a small
domain is enough to make the bar show.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from iommupt_store.domains import domain_alloc
from iommupt_store.fsck import fsck
from iommupt_store.machine import Machine
from iommupt_store.verify import verify_domain
from tests.conftest import InvokeCli, subprocess_env

#: the command line with bars shown at once (no one-second grace)
RUN = (
    "import sys; import iommupt_store.cli.render as r; r.PROGRESS_AFTER_S = 0; "
    "from iommupt_store.cli import main; main(sys.argv[1:])"
)


@pytest.fixture
def populated(cli: InvokeCli, db_path: Path) -> Path:
    for args in (["init", "--mem", "8G"], ["domain", "create", "x86_64"], ["map", "1", "0x0", "0x100000000", "8M"]):
        assert cli(*args).exit_code == 0
    return db_path


def run(db: Path, *args: str, tty: bool) -> tuple[int, str, str]:
    """``iommupt-store --db DB ARGS`` with stdout piped and stderr a terminal (``tty``) or a pipe."""
    argv = [sys.executable, "-c", RUN, "--db", str(db), *args]
    env = subprocess_env(TERM="xterm-256color", COLUMNS="100")
    env.pop("NO_COLOR", None)
    if not tty:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        return proc.returncode, proc.stdout, proc.stderr
    leader, follower = pty.openpty()
    try:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=follower, env=env)
        os.close(follower)
        out, err = child.stdout.read() if child.stdout else b"", b""  # the result fits the pipe
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            err += chunk
        code = child.wait(timeout=60)
    finally:
        os.close(leader)
    return code, out.decode(), err.decode(errors="replace")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["verify", "1"], "verifying domain 1"),  # reports frames read
        (["export-image", "mem.raw"], "exporting pages"),  # reports pages written
        (["show", "1"], "walking domain 1"),  # a step of unknown size: elapsed time
        (["fsck"], "checking the stored state"),
    ],
)
def test_bar_on_a_terminal_only_and_never_with_quiet(
    populated: Path, args: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # export-image writes its image here
    code, out, err = run(populated, *args, tty=True)
    assert code == 0, err
    assert says in err
    assert "\x1b[" in err  # drawn (and erased) with terminal controls
    assert "Traceback" not in out + err

    code, out_piped, err_piped = run(populated, *args, tty=False)
    assert code == 0 and err_piped == ""
    assert out_piped.strip() == out.strip()

    code, out_quiet, err_quiet = run(populated, "--quiet", *args, tty=True)
    assert code == 0
    assert err_quiet == ""
    assert out_quiet.strip() == out.strip()


def test_changing_commands_show_progress_too(populated: Path) -> None:
    code, _, err = run(populated, "map", "1", "0x40000000", "0x200000000", "4M", tty=True)
    assert code == 0 and "mapping 4M" in err
    code, _, err = run(populated, "-q", "map", "1", "0x80000000", "0x300000000", "4M", tty=True)
    assert code == 0 and err == ""
    code, _, err = run(populated, "map", "1", "0xc0000000", "0x400000000", "4M", tty=False)
    assert code == 0 and err == ""


def test_core_functions_report_progress(machine: Machine) -> None:
    """map, verify and fsck call ``progress(done, total)``; done grows to total."""
    calls: dict[str, list[tuple[int, int]]] = {"map": [], "verify": [], "fsck": []}
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0x0, 0x100001000, 4 << 20, progress=lambda d, t: calls["map"].append((d, t)))
    with machine.transaction(write=False) as tx:
        verify_domain(tx, dom.id, progress=lambda d, t: calls["verify"].append((d, t)))
        fsck(tx, lambda d, t: calls["fsck"].append((d, t)))
    assert calls["map"] == [(n << 21, 4 << 20) for n in (1, 2)]  # one call per leaf table filled
    assert calls["verify"] == [(1, 5), (2, 5), (3, 5), (5, 5)]  # top, level 2, level 1, both leaf tables at once
    assert calls["fsck"] == [(0, 1)]
