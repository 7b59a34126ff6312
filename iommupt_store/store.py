"""Opening a store: the database, its schema revision and its machines."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, insert, select, text

from .db import migrate, status_sql
from .db.connection import SharedConnection
from .db.engine import make_engine, resolve_url, translate_db_errors, writer
from .errors import AlreadyExists, InvalidArgument, NotFound
from .locations import DEFAULT_MACHINE as DEFAULT_MACHINE
from .locations import ENV_DB as ENV_DB
from .locations import default_location as default_location
from .names import check_machine_name
from .units import PAGE_SIZE, parse_number

if TYPE_CHECKING:
    from .machine import Machine
    from .reports import StoreStatus

# The ORM models (and pydantic) load with the first method that needs them: opening a store and
# reading its status (the ``status`` command on PostgreSQL) need SQLAlchemy Core only.

DEFAULT_MEM_BYTES = 64 << 30
MAX_MEM_BYTES = 1 << 52  # the widest OA any supported format can address


def check_mem_bytes(mem_bytes: int) -> int:
    """A machine's memory: whole 4 KiB pages, from 2 MiB up to what the widest output address reaches."""
    if mem_bytes < (2 << 20) or mem_bytes > MAX_MEM_BYTES or mem_bytes % PAGE_SIZE:
        raise InvalidArgument(f"memory size {mem_bytes:#x} must be a multiple of 4096 between 2 MiB and 4 PiB")
    return mem_bytes


class Store:
    """One database, and this process's one connection to it (see ``db.connection``).

    Every transaction of the store and of its machines reuses that connection,
    one transaction at a time: use a Store from one thread at a time (a
    transaction begun while another is open gets a connection of its own).
    ``close()`` closes the connection; a forked child opens its own.
    """

    def __init__(self, url_or_path: str | os.PathLike[str] | None = None, *, upgrade: bool = False) -> None:
        self.url = resolve_url(url_or_path if url_or_path is not None else default_location())
        # only init/upgrade may create a new SQLite file; anything else on a missing file is NotFound
        self.engine: Engine = make_engine(self.url, create=upgrade)
        self.writer: Engine = writer(self.engine)
        self._shared = SharedConnection(self.engine)
        try:
            if upgrade:
                migrate.upgrade(self.url)
            with self.begin(write=False) as conn:
                migrate.check_revision(conn, self.url)
        except BaseException:
            self.close()  # a refused database keeps no connection (nor its -wal and -shm files) open
            raise

    @classmethod
    def init(cls, url_or_path: str | os.PathLike[str] | None = None) -> Store:
        """Create the schema if the database is new (or upgrade it), then open it."""
        return cls(url_or_path, upgrade=True)

    @contextlib.contextmanager
    def begin(self, *, write: bool = True, read_only: bool = False) -> Iterator[Connection]:
        """A database transaction on this process's connection, with driver errors translated.

        ``write``: take the write lock up front and commit when the block exits
        normally; otherwise the transaction is rolled back. ``read_only``: the
        database itself refuses writes (for observers).
        """
        with translate_db_errors(self.url), self._shared.begin(write=write, read_only=read_only) as conn:
            yield conn

    def close(self) -> None:
        self._shared.close()
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- machines --------------------------------------------------------------
    def create_machine(self, name: str = DEFAULT_MACHINE, mem_bytes: int = DEFAULT_MEM_BYTES) -> None:
        from .db.models import Machine as MachineRow

        check_machine_name(name)
        check_mem_bytes(mem_bytes)
        with self.begin() as conn:
            if conn.execute(select(MachineRow.id).where(MachineRow.name == name)).first():
                raise AlreadyExists(f"machine {name!r} already exists")
            conn.execute(insert(MachineRow).values(name=name, mem_bytes=mem_bytes, page_size=PAGE_SIZE))

    def machine_id(self, conn: Connection, name: str) -> int:
        from .db.models import Machine as MachineRow

        mid = conn.execute(select(MachineRow.id).where(MachineRow.name == name)).scalar()
        if mid is None:
            known = conn.execute(select(MachineRow.name).order_by(MachineRow.name)).scalars().all()
            hint = f"; machines here: {', '.join(known)}" if known else "; create one with 'iommupt-store init'"
            raise NotFound(f"no machine named {name!r} in {self.url}{hint}")
        return mid

    def machine(self, name: str = DEFAULT_MACHINE, kernel: str | None = None) -> Machine:
        """Attach to the machine's current boot (starting a new boot if the last one ended), whose
        kernel runs profile ``kernel`` (``abi/profiles.py``; default ``$IOMMUPT_KERNEL``, else the
        newest; a running boot keeps its own and refuses another)."""
        from . import liveupdate  # noqa: F401 - registers what a new boot does with the handover
        from .machine import Machine

        return Machine.attach(self, name, kernel)

    def observe(self, name: str = DEFAULT_MACHINE) -> Machine:
        """The machine's latest boot for reading only: never starts a boot or writes a row."""
        from . import liveupdate  # noqa: F401 - the handover's readers
        from .machine import Machine

        return Machine.observe(self, name)

    def status_data(self) -> dict[str, Any]:
        """``status()`` as plain data, read with SQLAlchemy Core alone (no models, no pydantic)."""
        with self.begin(write=False) as conn:
            typed = _typed_statements()
            return status_sql.read_status(
                lambda sql, params: conn.execute(typed.get(sql, text(sql)), params).all(),
                self.url,
                migrate.current_revision(conn) or "",
            )

    def status(self) -> StoreStatus:
        """Every machine of the store, with its memory use and its boots."""
        from .reports import StoreStatus

        return StoreStatus.model_validate(self.status_data())


def _typed_statements() -> dict[str, Any]:
    """The statements of ``status_sql`` whose columns are read back as the models' checked types."""
    from .db import types

    kinds = {"int": types.Int, "u64": types.U64, "text": types.Text, "timestamp": types.Timestamp}
    out = {}
    for sql, columns in status_sql.COLUMNS.items():
        typed = {}
        for label, kind in columns:
            t = kinds[kind]() if kind != "timestamp" else types.Timestamp(timezone=True)
            t.label = label  # named in a MalformedValue error, as the models name it
            typed[label.split(".")[1]] = t
        out[sql] = text(sql).columns(**typed)
    return out


def open(
    url_or_path: str | os.PathLike[str] | None = None,
    machine: str = DEFAULT_MACHINE,
    *,
    upgrade: bool = False,
    kernel: str | None = None,
) -> Machine:
    """Open ``machine`` in the store at ``url_or_path`` and attach to its current boot.

    A bare path is an SQLite file; a URL goes to SQLAlchemy. Without a location,
    ``$IOMMUPT_DB`` or ``./iommupt.db`` is used. ``upgrade=True`` first brings
    an older schema to the current revision. ``kernel`` names the kernel profile
    a new boot runs (see ``Store.machine``). The store and the machine must
    exist: ``create`` makes them.
    """
    return Store(url_or_path, upgrade=upgrade).machine(machine, kernel)


def create(
    url_or_path: str | os.PathLike[str] | None = None,
    machine: str = DEFAULT_MACHINE,
    *,
    mem: int | str = DEFAULT_MEM_BYTES,
    kernel: str | None = None,
) -> Machine:
    """Create ``machine`` with ``mem`` of RAM and attach to its boot 1: a store ready to use in one call.

    The database at ``url_or_path`` (as for ``open``) is created if it does not
    exist, or brought to the current schema; the machine must be new
    (``AlreadyExists`` otherwise: ``open`` it instead). ``mem`` is a number of
    bytes or a size such as ``"4G"`` or ``"0x100000000"`` (K/M/G/T are powers of
    1024), whole 4 KiB pages from 2 MiB up.
    """
    mem_bytes = parse_number(mem) if isinstance(mem, str) else mem  # a bad size creates nothing
    store = Store.init(url_or_path)
    store.create_machine(machine, mem_bytes)
    return store.machine(machine, kernel)
