"""A machine as one process sees it: attached to the current boot.

Every operation runs in a ``Transaction``: one database transaction (writers
take the write lock up front) with one ``Memory`` unit of work, flushed in
bulk at commit. An exception anywhere rolls everything back; each public API
call that changes state is also all or nothing on its own (``atomic``), so a
caller that catches its exception and commits keeps nothing of it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from sqlalchemy import Connection, delete, insert, select, update

from .abi.profiles import DEFAULT as DEFAULT_PROFILE
from .abi.profiles import KernelProfile, get_profile, requested_profile
from .boot_history import check_boot_history
from .crash import crashpoint
from .db.models import Boot, Domain, Page
from .db.models import Machine as MachineRow
from .errors import InvalidArgument, KernelGone, NotPermitted
from .memory import PAGE_SHIFT, Memory
from .reports import MachineStatus

if TYPE_CHECKING:
    from .store import Store

#: called as hook(tx, ended_boot_number, end_kind) when a process starts boot N+1
BootStartHook = Callable[["Transaction", int, str], None]
BOOT_START_HOOKS: list[BootStartHook] = []
#: the savepoint of one all-or-nothing API call (``Transaction.atomic``); calls do not nest savepoints
_SAVEPOINT = "iommupt_call"


def lock_machine_row(conn: Connection, machine_id: int) -> None:
    """Serialize the writers of one machine until this transaction ends.

    SQLite writers already hold the database's write lock (``BEGIN IMMEDIATE``);
    elsewhere the machine row is locked ``FOR UPDATE``, so two processes that
    both find the last boot ended cannot both start the next one.
    """
    if conn.dialect.name != "sqlite":
        conn.execute(select(MachineRow.id).where(MachineRow.id == machine_id).with_for_update())


class Transaction:
    """One unit of work on one machine's current boot."""

    def __init__(self, machine: Machine, conn: Connection) -> None:
        self.machine = machine
        self.conn = conn
        self.memory = Memory(conn, machine.id, machine.boot_id, machine.mem_bytes >> PAGE_SHIFT)
        #: run before the memory flush, e.g. to write domain rows
        self.before_flush: list[Callable[[], None]] = []
        #: run after a successful commit
        self.after_commit: list[Callable[[], None]] = []
        #: per-transaction caches of the layers above (domains by id, ...)
        self.cache: dict[str, Any] = {}
        #: run after ``atomic`` rolled a failed call back, e.g. to reload cached domains
        self.after_rollback: list[Callable[[], None]] = []
        self._atomic_depth = 0

    def flush(self) -> None:
        self._write_rows()
        self.memory.flush()

    def close(self) -> None:
        """Let go of everything cached, at once: the callbacks refer back to this transaction,
        so without this its pages would wait for the garbage collector."""
        self.before_flush.clear()
        self.after_commit.clear()
        self.after_rollback.clear()
        self.cache.clear()
        self.memory.release()

    def _write_rows(self) -> None:
        for fn in self.before_flush:
            fn()

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Make one API call all or nothing, even if the caller catches its exception and commits.

        A savepoint is opened and the memory keeps an undo log of the pages the
        call changes (pages stay unwritten until commit: many small calls do not
        pay a flush each). If the call raises, the savepoint is rolled back, the
        pages are put back, and the layers' caches and callbacks added since are
        dropped or reloaded from the database. Calls made from inside such a
        call share the outer savepoint.
        """
        if self._atomic_depth:
            yield
            return
        # rows of cached objects (domains) are written now, so the savepoint holds their state
        self._write_rows()
        marks = (len(self.before_flush), len(self.after_commit), len(self.after_rollback), set(self.cache))
        # plain statements: begin_nested() compiles them anew on every call, which costs more than a small map
        self.conn.exec_driver_sql(f"SAVEPOINT {_SAVEPOINT}")
        self.memory.start_undo_log()
        self._atomic_depth += 1
        try:
            yield
        except BaseException:
            self.conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            self.conn.exec_driver_sql(f"RELEASE SAVEPOINT {_SAVEPOINT}")
            self._forget_since(*marks)
            raise
        else:
            self.conn.exec_driver_sql(f"RELEASE SAVEPOINT {_SAVEPOINT}")
            self.memory.drop_undo_log()
        finally:
            self._atomic_depth -= 1

    def _forget_since(self, n_before_flush: int, n_after_commit: int, n_after_rollback: int, keys: set[str]) -> None:
        del self.before_flush[n_before_flush:]
        del self.after_commit[n_after_commit:]
        del self.after_rollback[n_after_rollback:]
        for key in set(self.cache) - keys:
            del self.cache[key]
        self.memory.undo()
        for fn in self.after_rollback:
            fn()


P = ParamSpec("P")
R = TypeVar("R")


def atomic(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a public API function that changes state: all or nothing per call (``Transaction.atomic``).

    Its first argument is the ``Transaction`` or an object bound to one (``.tx``, e.g. a ``Domain``).
    """

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        tx = args[0] if isinstance(args[0], Transaction) else getattr(args[0], "tx", None)
        if not isinstance(tx, Transaction):
            raise TypeError(f"{fn.__qualname__} needs a Transaction (or an object bound to one) first")
        with tx.atomic():
            return fn(*args, **kwargs)

    return call


class Machine:
    """The kernel of the current boot of one machine, in this process."""

    def __init__(self, store: Store, name: str, mid: int, mem_bytes: int, boot_id: int, boot_number: int):
        self.store = store
        self.name = name
        self.id = mid
        self.mem_bytes = mem_bytes
        self.boot_id = boot_id
        self.boot_number = boot_number
        self._gone: str | None = None
        #: an observer (``observe``): reads the latest boot, never attaches or writes
        self.read_only = False
        #: how the observed boot ended (None: still running, or never booted)
        self.boot_end_kind: str | None = None
        #: the kernel profile the boot runs (``abi/profiles.py``)
        self.profile_name = DEFAULT_PROFILE

    @property
    def profile(self) -> KernelProfile:
        return get_profile(self.profile_name)

    @classmethod
    def attach(cls, store: Store, name: str, kernel: str | None = None) -> Machine:
        """Attach to the current boot, or start the next one under kernel profile ``kernel``
        (default ``$IOMMUPT_KERNEL``, else the newest). A running boot keeps its profile."""
        requested = requested_profile(kernel)
        with store.begin() as conn:
            mid = store.machine_id(conn, name)
            lock_machine_row(conn, mid)
            # read after the lock: a process that started the new boot while we waited has committed it
            check_boot_history(conn, mid, name)  # before a new boot frees anything
            mem_bytes, last = _memory_and_last_boot(conn, mid)
            if last is not None and last.end_kind is None:
                if requested is not None and requested != last.kernel_profile:
                    raise NotPermitted(
                        f"boot {last.number} of machine {name!r} runs kernel profile {last.kernel_profile!r}: "
                        f"the kernel of a running boot cannot change (attach without a profile, or end the boot)"
                    )
                running = cls(store, name, mid, mem_bytes, last.id, last.number)
                running.profile_name = last.kernel_profile
                return running
            number = 1 if last is None else last.number + 1
            profile = requested or DEFAULT_PROFILE
            boot_id = conn.execute(
                insert(Boot).values(machine_id=mid, number=number, kernel_profile=profile).returning(Boot.id)
            ).scalar_one()
            machine = cls(store, name, mid, mem_bytes, boot_id, number)
            machine.profile_name = profile
            if last is not None:
                tx = Transaction(machine, conn)
                for hook in BOOT_START_HOOKS:
                    hook(tx, last.number, str(last.end_kind))
                tx.flush()
                tx.close()
            crashpoint("boot_start")
            return machine

    @classmethod
    def observe(cls, store: Store, name: str) -> Machine:
        """The machine as it stands, for reading only: the latest boot, running or ended.

        Unlike ``attach`` this never starts boot N+1, frees memory or writes a row,
        so looking at a machine between a sealed live update and the next kernel
        shows the ended boot and what it handed over. A machine that never booted
        is observed as boot 0, which owns nothing.
        """
        with store.begin(write=False, read_only=True) as conn:
            mid = store.machine_id(conn, name)
            mem_bytes, last = _memory_and_last_boot(conn, mid)
        machine = cls(store, name, mid, mem_bytes, last.id if last else 0, last.number if last else 0)
        machine.read_only = True
        machine.boot_end_kind = last.end_kind if last else None
        machine.profile_name = last.kernel_profile if last else DEFAULT_PROFILE
        return machine

    # -- transactions ------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._gone:
            raise KernelGone(f"boot {self.boot_number} of machine {self.name!r} has ended ({self._gone})")

    def _check_current(self, conn: Connection) -> None:
        row = conn.execute(select(Boot.end_kind).where(Boot.id == self.boot_id)).first()
        if row is None or row.end_kind is not None:
            self._gone = f"ended by another process ({row.end_kind if row else 'deleted'})"
            self._check_alive()

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Transaction]:
        """A unit of work; committed (after a bulk flush) when the block exits normally.

        A read-only transaction (``write=False``) takes no write lock and is
        always rolled back.
        """
        self._check_alive()
        if write and self.read_only:
            raise NotPermitted(f"machine {self.name!r} is open for inspection only: this command cannot change it")
        with self.store.begin(write=write, read_only=self.read_only) as conn:
            if write:
                lock_machine_row(conn, self.id)
            if not self.read_only:
                self._check_current(conn)
            tx = Transaction(self, conn)
            try:
                yield tx
                if write:
                    tx.flush()
                    crashpoint("before_commit")
            except BaseException:
                tx.close()
                raise
        try:
            for fn in tx.after_commit:
                fn()
        finally:
            tx.close()

    def end_boot(self, tx: Transaction, kind: str) -> None:
        """Mark the current boot ended; this object refuses everything afterwards."""
        tx.conn.execute(
            update(Boot).where(Boot.id == self.boot_id).values(ended_at=dt.datetime.now(dt.UTC), end_kind=kind)
        )
        self._gone = "cold reboot" if kind == "cold" else "live update"

    def reboot(self, *, cold: bool = True) -> None:
        """End this boot. A cold reboot frees all memory; the next open starts boot N+1."""
        if not cold:
            raise InvalidArgument("only a cold reboot is done here; a live update is 'liveupdate'")
        with self.transaction() as tx:
            tx.conn.execute(delete(Page).where(Page.machine_id == self.id))
            tx.conn.execute(
                update(Domain)
                .where(Domain.machine_id == self.id, Domain.state != "freed")
                .values(state="freed", top_phys=None)
            )
            tx.memory = Memory(tx.conn, self.id, self.boot_id, self.mem_bytes >> PAGE_SHIFT)
            from .mappings import drop_freed  # the ledger sits above this module

            drop_freed(tx)
            self.end_boot(tx, "cold")

    def status(self) -> MachineStatus:
        for m in self.store.status().machines:
            if m.name == self.name:
                return m
        raise AssertionError("machine vanished")  # pragma: no cover


def _memory_and_last_boot(conn: Connection, mid: int) -> tuple[int, Any]:
    """The machine's memory size and its newest boot row (id, number, end_kind, kernel_profile), or None
    before boot 1."""
    mem_bytes = conn.execute(select(MachineRow.mem_bytes).where(MachineRow.id == mid)).scalar_one()
    last = conn.execute(
        select(Boot.id, Boot.number, Boot.end_kind, Boot.kernel_profile)
        .where(Boot.machine_id == mid)
        .order_by(Boot.number.desc())
        .limit(1)
    ).first()
    return mem_bytes, last
