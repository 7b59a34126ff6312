"""Shared fixtures and helpers for the whole test suite.

Fixtures
--------
``db_path``      a fresh SQLite path under ``tmp_path`` (the file does not exist yet)
``db_url``       the same as an SQLAlchemy URL
``store``        an initialised ``Store`` at ``db_path`` (schema at head, no machine); closed afterwards
``machine``      a 64 MiB machine named ``"test"`` in ``store``, attached to boot 1
``small_machine``  a 2 MiB machine named ``"small"`` (256 usable pages: the first MiB is firmware's)
``run_cli``      ``run_cli(*args)`` runs ``python -m iommupt_store --db <db_path> *args`` in a subprocess
``run_py``       ``run_py(code, *args)`` runs a Python snippet in a subprocess (``sys.argv[1:] == args``)
``cli``          ``cli(*args)`` invokes the click CLI in-process (CliRunner) with ``--db <db_path>``

Plain helpers (import them: ``from tests.conftest import sqlite_dump``)
-----------------------------------------------------------------------
``sqlite_dump(path)``   every row of every table, for "nothing changed" comparisons
``integrity(path)``     ``(PRAGMA integrity_check, PRAGMA foreign_key_check rows)``
``subprocess_env()``    an environment in which a child imports this very ``iommupt_store``

Subprocesses never inherit an engine: each opens its own (see spec B5).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from click.testing import CliRunner, Result

import iommupt_store
from iommupt_store.cli import cli as cli_group
from iommupt_store.machine import Machine
from iommupt_store.store import Store

#: the directory that holds the ``iommupt_store`` package under test (a checkout or site-packages)
PACKAGE_PARENT = Path(iommupt_store.__file__).resolve().parent.parent
#: generous: a loaded CI machine may be slow, but a hung child must not hang the suite
SUBPROCESS_TIMEOUT = 60


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment, made deterministic for a child process.

    The child imports the same ``iommupt_store`` as the tests (even from an
    uninstalled checkout), never sees the developer's ``IOMMUPT_*`` settings,
    and does not colour its output.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOMMUPT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH")) if p)
    env.update(NO_COLOR="1", TERM="dumb", COLUMNS="200", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


class RunCli(Protocol):
    def __call__(
        self,
        *args: str,
        db: Path | str | None = ...,
        env: dict[str, str] | None = ...,
        input: str | None = ...,
        timeout: float = ...,
    ) -> subprocess.CompletedProcess[str]: ...


class RunPy(Protocol):
    def __call__(
        self, code: str, *args: str, env: dict[str, str] | None = ..., timeout: float = ...
    ) -> subprocess.CompletedProcess[str]: ...


class InvokeCli(Protocol):
    def __call__(self, *args: str, db: Path | str | None = ..., env: dict[str, str] | None = ...) -> Result: ...


@pytest.fixture(autouse=True)
def _no_user_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up the developer's ``$IOMMUPT_DB``/``$IOMMUPT_MACHINE``/crash points."""
    for name in [k for k in os.environ if k.startswith("IOMMUPT_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def db_url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store.init(db_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def machine(store: Store) -> Machine:
    store.create_machine("test", 64 << 20)
    return store.machine("test")


@pytest.fixture
def small_machine(store: Store) -> Machine:
    store.create_machine("small", 2 << 20)
    return store.machine("small")


@pytest.fixture
def run_cli(db_path: Path, tmp_path: Path) -> RunCli:
    """Run the real command line in a child process; returns the CompletedProcess (text).

    ``db`` defaults to the test's ``db_path``; pass ``db=None`` to give no
    ``--db`` at all (then ``$IOMMUPT_DB`` or ./iommupt.db in ``tmp_path`` applies).
    """

    def run(
        *args: str,
        db: Path | str | None = db_path,
        env: dict[str, str] | None = None,
        input: str | None = None,
        timeout: float = SUBPROCESS_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "iommupt_store"]
        if db is not None:
            argv += ["--db", str(db)]
        return subprocess.run(
            [*argv, *args],
            capture_output=True,
            text=True,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            env=subprocess_env(**(env or {})),
            cwd=tmp_path,
            timeout=timeout,
        )

    return run


@pytest.fixture
def run_py(tmp_path: Path) -> RunPy:
    """Run ``python -c code *args`` in a child process with ``subprocess_env``."""

    def run(
        code: str, *args: str, env: dict[str, str] | None = None, timeout: float = SUBPROCESS_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=subprocess_env(**(env or {})),
            cwd=tmp_path,
            timeout=timeout,
        )

    return run


@pytest.fixture
def cli(db_path: Path) -> InvokeCli:
    """Invoke the click group in-process; ``result.stdout``/``result.stderr`` are separate."""

    def invoke(*args: str, db: Path | str | None = db_path, env: dict[str, str] | None = None) -> Result:
        argv = ["--db", str(db)] if db is not None else []
        return CliRunner().invoke(cli_group, [*argv, *args], env=env, catch_exceptions=False)

    return invoke


def sqlite_dump(path: Path | str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (sorted); refuses (never creates) a missing file."""
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True)  # rw: never creates a file
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        return {n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
    finally:
        conn.close()


def integrity(path: Path | str) -> tuple[str, list[tuple[Any, ...]]]:
    """``PRAGMA integrity_check`` (``'ok'`` when sound) and the rows of ``PRAGMA foreign_key_check``."""
    conn = sqlite3.connect(path)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        fks = conn.execute("PRAGMA foreign_key_check").fetchall()
        return check, fks
    finally:
        conn.close()


def one_error_line(stderr: str) -> str:
    """Assert that ``stderr`` is exactly one non-empty line, and return it."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    return lines[0]


__all__ = [
    "PACKAGE_PARENT",
    "SUBPROCESS_TIMEOUT",
    "InvokeCli",
    "RunCli",
    "RunPy",
    "integrity",
    "one_error_line",
    "sqlite_dump",
    "subprocess_env",
]


# -- live-update helpers (tests/test_liveupdate_*.py) ------------------------------------------------


def run_python(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = SUBPROCESS_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``python -c code *args`` in a child with ``subprocess_env`` (usable from module-scoped fixtures).

    A child is a kernel: its exit (normal or by ``kill -9``) ends what it held in memory.
    """
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=subprocess_env(**(env or {})),
        timeout=timeout,
    )


def sql(db: Path | str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement with the stock sqlite3 module (as a user tampering by hand) and commit."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(query, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def crash_then_rerun(db: Path, code: str, args: list[str], point: str) -> Any:
    """Run ``code`` in a child that SIGKILLs itself at crash point ``point``; check that the next
    process finds exactly the state before, in a sound file; rerun the operation, which must succeed,
    and return what the rerun printed (JSON)."""
    import json
    import signal

    before = sqlite_dump(db)
    crashed = run_python(code, *args, env={"IOMMUPT_CRASHPOINT": point})
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr[-2000:])
    assert crashed.stdout == ""
    assert integrity(db) == ("ok", [])
    assert sqlite_dump(db) == before
    again = run_python(code, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sqlite_dump(db) != before
    assert integrity(db) == ("ok", [])
    return json.loads(again.stdout)


def run_python_ok(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``run_python`` that must exit 0 (the child's stderr is shown otherwise)."""
    proc = run_python(code, *args, env=env)
    assert proc.returncode == 0, f"child exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="session")
def _lu_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lu-template") / "lu.db"
    with Store.init(path) as s:
        s.create_machine("lu", 64 << 20)
    assert not path.with_name("lu.db-wal").exists() or path.with_name("lu.db-wal").stat().st_size == 0
    return path


@pytest.fixture
def lu_db(tmp_path: Path, _lu_db_template: Path) -> Path:
    """A fresh store with a 64 MiB machine named ``"lu"`` that no process has attached to yet.

    A copy of one template (migrating a new database for every test is slow).
    """
    path = tmp_path / "lu.db"
    path.write_bytes(_lu_db_template.read_bytes())
    return path


# -- sessions and devices (tests/test_sessions_*.py) --------------------------------------------------

#: the world ``session_world`` builds in boot N (see ``SessionWorld``)
SW_SESSION, SW_SESSION2, SW_OWNER = "vmm", "other-vmm", "vfio-vmm"
SW_TOKEN_A, SW_TOKEN_B, SW_TOKEN_U, SW_TOKEN_O = 0xA1, 0xB1, 0xC1, 0xE1
SW_DEV_A0, SW_DEV_A1, SW_DEV_B, SW_DEV_L, SW_DEV_O = (
    "0000:3b:00.0",
    "0000:3b:00.1",
    "0000:3c:00.0",
    "0000:5e:00.0",
    "0000:6f:00.0",
)
#: device tokens
SW_TOKEN_DEV = {SW_DEV_A0: 0xD0, SW_DEV_A1: 0xD1, SW_DEV_B: 0xD2}


class SessionWorld:
    """Boot N of machine ``"lu"`` (in ``lu_db``), built in this process.

    * session ``SW_SESSION``: domain A (x86_64: a 4K run and the test_mixed range) under ``SW_TOKEN_A``
      with devices ``SW_DEV_A0`` and ``SW_DEV_A1`` (one DID, shared); domain B (vtdss) under
      ``SW_TOKEN_B`` with device ``SW_DEV_B``; domain U (amdv1, no device) under ``SW_TOKEN_U``.
      Devices are owned by ``SW_OWNER`` and preserved under ``SW_TOKEN_DEV``.
    * session ``SW_SESSION2``: domain O (vtdss) under ``SW_TOKEN_O``; device ``SW_DEV_O`` is attached
      to O but not preserved.
    * domain L (riscv), live, with device ``SW_DEV_L`` (owner ``"other"``) attached, not preserved.
    """

    def __init__(self, db: Path) -> None:
        from iommupt_store.devices import attach
        from iommupt_store.domains import domain_alloc
        from iommupt_store.liveupdate.sessions import create_session, preserve_device, preserve_domain_in_session

        self.db = db
        self.store = Store(db)
        with self.machine().transaction() as tx:
            create_session(tx, SW_SESSION)
            create_session(tx, SW_SESSION2)
            a = domain_alloc(tx, "x86_64")
            a.map_range(0x40000000, 0x80001000, 1 << 20)
            a.map_range(0x3FE400000, 0x3FE400000, 0xC2200000)
            b = domain_alloc(tx, "vtdss")
            b.map_range(0x40000000, 0x80001000, 2 << 20)
            u = domain_alloc(tx, "amdv1")
            u.map_range(0x10000, 0x10000, 0x30000)
            o = domain_alloc(tx, "vtdss")
            o.map_range(0x1000, 0x1000, 0x4000)
            lo = domain_alloc(tx, "riscv")
            lo.map_range(0x1000, 0x2000, 0x4000)
            self.a, self.b, self.u, self.o, self.l = a.id, b.id, u.id, o.id, lo.id
            attach(tx, SW_DEV_A0, a.id, owner=SW_OWNER)
            attach(tx, SW_DEV_A1, a.id, owner=SW_OWNER)
            attach(tx, SW_DEV_B, b.id, owner=SW_OWNER)
            attach(tx, SW_DEV_O, o.id, owner=SW_OWNER)
            attach(tx, SW_DEV_L, lo.id, owner="other")
            preserve_domain_in_session(tx, SW_SESSION, a.id, SW_TOKEN_A)
            preserve_domain_in_session(tx, SW_SESSION, b.id, SW_TOKEN_B)
            preserve_domain_in_session(tx, SW_SESSION, u.id, SW_TOKEN_U)
            preserve_domain_in_session(tx, SW_SESSION2, o.id, SW_TOKEN_O)
            for bdf, token in SW_TOKEN_DEV.items():
                preserve_device(tx, SW_SESSION, bdf, token)

    def machine(self) -> Machine:
        """The machine's current boot (opening it after a seal starts the next boot)."""
        return self.store.machine("lu")

    def tx(self, fn: Any) -> Any:
        """``fn(tx)`` in one write transaction of the current boot."""
        with self.machine().transaction() as tx:
            return fn(tx)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        return sql(self.db, query, *params)

    def seal(self) -> None:
        """``liveupdate`` (the kexec), then start boot N+1 in this process."""
        from iommupt_store.liveupdate import liveupdate

        boot = self.machine().boot_number
        liveupdate(self.machine())
        assert self.machine().boot_number == boot + 1

    def retrieve(self, name: str = SW_SESSION) -> None:
        from iommupt_store.liveupdate.sessions import retrieve_session

        self.tx(lambda tx: retrieve_session(tx, name))

    def restore(self, token: int) -> int:
        from iommupt_store.liveupdate import restore_domain

        return int(self.tx(lambda tx: restore_domain(tx, token).id))

    def new_domain(self, fmt: str = "x86_64") -> int:
        from iommupt_store.domains import domain_alloc

        return int(self.tx(lambda tx: domain_alloc(tx, fmt).id))

    def did(self, bdf: str) -> int | None:
        rows = self.sql("SELECT did FROM device WHERE bdf = ?", bdf)
        return rows[0][0] if rows else None


@pytest.fixture
def session_world(lu_db: Path) -> Iterator[SessionWorld]:
    """``SessionWorld`` in boot N, before the seal."""
    world = SessionWorld(lu_db)
    try:
        yield world
    finally:
        world.store.close()
