"""Every public call that changes state is all or nothing, even inside the caller's own transaction.

Each case makes one call fail part-way (bad arguments, ENOMEM, EADDRINUSE, or an exception injected at
the operation's crash point, i.e. after it has written) inside a transaction that the caller then goes on
using and commits. The database must then hold exactly what it held before, and fsck must stay clean.
Runs on SQLite, and on PostgreSQL when ``IOMMUPT_TEST_PG_URL`` names a server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, select

import iommupt_store.devices as devices_mod
import iommupt_store.liveupdate.iommu as iommu_mod
import iommupt_store.liveupdate.sessions as sessions_mod
from iommupt_store.devices import attach, detach, replace
from iommupt_store.domains import Domain, domain_alloc, frame_counts, get_domain, list_domains
from iommupt_store.errors import (
    AddressInUse,
    AlreadyExists,
    Busy,
    InvalidArgument,
    IommuptError,
    NotFound,
    NotPermitted,
    NotSupported,
    OutOfMemory,
)
from iommupt_store.fsck import fsck
from iommupt_store.liveupdate import (
    liveupdate,
    preserve_domain,
    preserve_pages,
    restore_domain,
    restore_pages,
    unpreserve_domain,
    unpreserve_pages,
)
from iommupt_store.liveupdate.sessions import (
    close_session,
    create_session,
    finish_session,
    preserve_device,
    preserve_domain_in_session,
    retrieve_session,
)
from iommupt_store.machine import Machine, Transaction
from iommupt_store.memory import PAGE_SHIFT
from iommupt_store.store import Store
from tests.test_postgres import PG_URL, fresh_pg_database

SESSION, SESSION2, SESSION3, OWNER = "vm", "vm2", "vm3", "vmm"
DEV_A, DEV_P, DEV_R = "0000:3b:00.0", "0000:3b:00.1", "0000:3c:00.0"
TOKEN_P, TOKEN_P_DEV, TOKEN_Q, TOKEN_R, TOKEN_R_DEV, TOKEN_S = 0x10, 0x11, 0x20, 0x30, 0x31, 0x40
A_IOVA, A_PADDR, A_SIZE = 0x400000, 0x100001000, 4 << 20


class Injected(RuntimeError):
    """An unexpected failure in the middle of an operation (not one of the model's errors)."""


@dataclass
class World:
    """Boot 1 (or 2) of machine ``atom``, plus two machines whose memory is (almost) full.

    Boot 1: session ``vm`` holds vtdss domain P (device DEV_P) under TOKEN_P and the device under
    TOKEN_P_DEV; session ``vm2`` holds domain R (device DEV_R); session ``vm3`` holds domain S; amdv1
    domain Q is preserved outside any session under TOKEN_Q; x86_64 domain A (4 MiB in 4K pages at
    4 MiB, device DEV_A) is live.
    ``tiny0`` has no free page; ``tiny2`` has a domain T and two free pages.
    """

    store: Store
    a: int
    p: int
    q: int
    r: int
    t: int
    #: boot 2 only: sessions vm and vm2 retrieved, R restored, and a new live domain N for ``replace``
    restored_r: int = 0
    n: int = 0

    def machine(self, name: str = "atom") -> Machine:
        return self.store.machine(name)


def _fill(tx: Transaction, leave: int) -> None:
    pfns = []
    try:
        while True:
            pfns.append(tx.memory.alloc("filler"))
    except OutOfMemory:
        pass
    for pfn in pfns[len(pfns) - leave :] if leave else []:
        tx.memory.free(pfn)


def build_boot1(url: str) -> World:
    store = Store.init(url)
    for name, mem in (("atom", 64 << 20), ("tiny0", 2 << 20), ("tiny2", 2 << 20)):
        store.create_machine(name, mem)
    with store.machine("atom").transaction() as tx:
        create_session(tx, SESSION)
        create_session(tx, SESSION2)
        create_session(tx, SESSION3)
        s = domain_alloc(tx, "riscv")
        s.map_range(0, 0x1000, 0x1000)
        preserve_domain_in_session(tx, SESSION3, s.id, TOKEN_S)
        a = domain_alloc(tx, "x86_64")
        a.map_range(A_IOVA, A_PADDR, A_SIZE)
        attach(tx, DEV_A, a.id, owner=OWNER)
        p = domain_alloc(tx, "vtdss")
        p.map_range(0x40000000, 0x80000000, 2 << 20)
        attach(tx, DEV_P, p.id, owner=OWNER)
        preserve_domain_in_session(tx, SESSION, p.id, TOKEN_P)
        preserve_device(tx, SESSION, DEV_P, TOKEN_P_DEV)
        r = domain_alloc(tx, "x86_64")
        r.map_range(0x200000, 0x300000, 1 << 20)
        attach(tx, DEV_R, r.id, owner=OWNER)
        preserve_domain_in_session(tx, SESSION2, r.id, TOKEN_R)
        preserve_device(tx, SESSION2, DEV_R, TOKEN_R_DEV)
        q = domain_alloc(tx, "amdv1")
        q.map_range(1 << 40, 0x5000, 0x3000)
        preserve_domain(tx, q.id, TOKEN_Q)
    with store.machine("tiny0").transaction() as tx:
        _fill(tx, 0)
    with store.machine("tiny2").transaction() as tx:
        t = domain_alloc(tx, "x86_64").id
        _fill(tx, 2)
    return World(store, a.id, p.id, q.id, r.id, t)


def build_boot2(url: str) -> World:
    w = build_boot1(url)
    liveupdate(w.machine())
    with w.machine().transaction() as tx:
        retrieve_session(tx, SESSION)
        retrieve_session(tx, SESSION2)
        w.restored_r = restore_domain(tx, TOKEN_R).id
        w.n = domain_alloc(tx, "x86_64").id
    return w


def dump(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, on any backend."""
    meta = MetaData()
    with store.engine.connect() as conn:
        meta.reflect(conn)
        return {t.name: sorted((tuple(r) for r in conn.execute(select(t))), key=repr) for t in meta.sorted_tables}


def fsck_problems(store: Store) -> list[str]:
    problems = []
    for name in ("atom", "tiny0", "tiny2"):
        with store.machine(name).transaction(write=False) as tx:
            problems += fsck(tx).problems
    return problems


def _backend_url(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if kind == "sqlite":
        yield str(tmp_path_factory.mktemp("atomic") / "store.db")
    elif not PG_URL:
        pytest.skip("IOMMUPT_TEST_PG_URL is not set")
    else:
        with fresh_pg_database() as url:
            yield url


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module", params=BACKENDS)
def boot1(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for url in _backend_url(request.param, tmp_path_factory):
        w = build_boot1(url)
        yield w
        w.store.close()


@pytest.fixture(scope="module", params=BACKENDS)
def boot2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for url in _backend_url(request.param, tmp_path_factory):
        w = build_boot2(url)
        yield w
        w.store.close()


def inject_at(monkeypatch: pytest.MonkeyPatch, module: Any, point: str) -> None:
    """Raise ``Injected`` where ``module`` reaches crash point ``point`` (after it has written)."""

    def crashpoint(name: str) -> None:
        if name == point:
            raise Injected(point)

    monkeypatch.setattr(module, "crashpoint", crashpoint)


def after(fn: Callable[..., Any], exc: type[BaseException] = Injected) -> Callable[..., Any]:
    """``fn`` runs in full, then raises: a failure after every write of the call it is part of."""

    def run(*args: Any, **kwargs: Any) -> Any:
        fn(*args, **kwargs)
        raise exc("injected")

    return run


Case = Callable[[Transaction, World, pytest.MonkeyPatch], Any]
BOOT1: dict[str, tuple[str, Case, type[BaseException]]] = {}
BOOT2: dict[str, tuple[str, Case, type[BaseException]]] = {}


def case(
    table: dict[str, tuple[str, Case, type[BaseException]]], name: str, exc: type[BaseException], machine: str = "atom"
):  # type: ignore[no-untyped-def]
    def register(fn: Case) -> Case:
        table[name] = (machine, fn, exc)
        return fn

    return register


# -- boot 1 -----------------------------------------------------------------------------------------
case(BOOT1, "domain_alloc-unknown-format", InvalidArgument)(lambda tx, w, mp: domain_alloc(tx, "arm64"))
case(BOOT1, "domain_alloc-bad-top-level", NotSupported)(lambda tx, w, mp: domain_alloc(tx, "x86_64", top_level=7))
case(BOOT1, "domain_alloc-bad-vasz", InvalidArgument)(lambda tx, w, mp: domain_alloc(tx, "vtdss", vasz=80))
case(BOOT1, "domain_alloc-bad-feature", NotSupported)(
    lambda tx, w, mp: domain_alloc(tx, "x86_64", features=["RISCV_SVPBMT"])
)
case(BOOT1, "domain_alloc-ENOMEM", OutOfMemory, "tiny0")(lambda tx, w, mp: domain_alloc(tx, "vtdss"))
case(BOOT1, "map-ENOMEM-part-way", OutOfMemory, "tiny2")(
    lambda tx, w, mp: get_domain(tx, w.t).map_range(0, 0x100000000, 0x1000)
)
case(BOOT1, "map-EADDRINUSE-part-way", AddressInUse)(
    # 4K pages from 2 MiB below A's range up into it: the first 512 are placed, then the overlap
    lambda tx, w, mp: get_domain(tx, w.a).map_range(A_IOVA + A_SIZE - 0x1000 - (2 << 20), 0x1000, 4 << 20)
)
case(BOOT1, "map-zero-length", InvalidArgument)(lambda tx, w, mp: get_domain(tx, w.a).map_range(0x10000000, 0, 0))
case(BOOT1, "map-preserved", NotPermitted)(lambda tx, w, mp: get_domain(tx, w.p).map_range(0, 0, 0x1000))


@case(BOOT1, "map-injected-after-write", Injected)
def _map_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    dom = get_domain(tx, w.a)
    mp.setattr(dom.pt, "map_range", after(dom.pt.map_range))
    dom.map_range(0x40000000, 0x1000, 3 << 20)


@case(BOOT1, "unmap-injected-after-freeing-tables", Injected)
def _unmap_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    dom = get_domain(tx, w.a)
    mp.setattr(dom.pt.frames, "free_tables", after(dom.pt.frames.free_tables))
    dom.unmap_range(A_IOVA, A_SIZE)


case(BOOT1, "unmap-preserved", NotPermitted)(lambda tx, w, mp: get_domain(tx, w.p).unmap_range(0, 0x1000))


@case(BOOT1, "free-injected-after-freeing-frames", Injected, "tiny2")
def _free_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    dom = get_domain(tx, w.t)
    mp.setattr(Domain, "set_state", after(Domain.set_state))
    dom.free()


case(BOOT1, "free-attached", Busy)(lambda tx, w, mp: get_domain(tx, w.a).free())
case(BOOT1, "free-preserved", NotPermitted)(lambda tx, w, mp: get_domain(tx, w.q).free())


@case(BOOT1, "preserve-injected", Injected)
def _preserve_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    inject_at(mp, iommu_mod, "preserve")
    preserve_domain(tx, w.a, 0x99)


case(BOOT1, "preserve-token-in-use", AlreadyExists)(lambda tx, w, mp: preserve_domain(tx, w.a, TOKEN_P))
case(BOOT1, "preserve-token-not-u64", InvalidArgument)(lambda tx, w, mp: preserve_domain(tx, w.a, -1))


@case(BOOT1, "unpreserve-injected", Injected)
def _unpreserve_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    inject_at(mp, iommu_mod, "unpreserve")
    unpreserve_domain(tx, TOKEN_Q)


case(BOOT1, "unpreserve-used-by-device", Busy)(lambda tx, w, mp: unpreserve_domain(tx, TOKEN_P))
case(BOOT1, "preserve_pages-unallocated", InvalidArgument)(
    lambda tx, w, mp: preserve_pages(tx, [(0x200, 0), (0x3FFF, 0)], "test")
)


@case(BOOT1, "preserve_pages-injected", Injected)
def _preserve_pages_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    pfn = get_domain(tx, w.a).pt.top_phys >> PAGE_SHIFT
    mp.setattr(iommu_mod.kho, "content_hash", after(iommu_mod.kho.content_hash))
    preserve_pages(tx, [(pfn, 0)], "test")


case(BOOT1, "unpreserve_pages-wrong-owner", NotPermitted)(
    lambda tx, w, mp: unpreserve_pages(tx, [(get_domain(tx, w.q).pt.top_phys >> PAGE_SHIFT, 0)], "test")
)
case(BOOT1, "create_session-bad-name", InvalidArgument)(lambda tx, w, mp: create_session(tx, "x" * 64))
case(BOOT1, "create_session-exists", AlreadyExists)(lambda tx, w, mp: create_session(tx, SESSION))


@case(BOOT1, "preserve_in_session-injected", Injected)
def _preserve_in_session_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    inject_at(mp, iommu_mod, "preserve")
    preserve_domain_in_session(tx, SESSION, w.a, 0x98)


case(BOOT1, "preserve_device-domain-not-in-session", InvalidArgument)(
    lambda tx, w, mp: preserve_device(tx, SESSION, DEV_A, 0x97)
)


case(BOOT1, "preserve_device-twice", AlreadyExists)(lambda tx, w, mp: preserve_device(tx, SESSION, DEV_P, 0x96))


@case(BOOT1, "close_session-injected", Injected)
def _close_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    inject_at(mp, sessions_mod, "session_close")
    close_session(tx, SESSION)


@case(BOOT1, "attach-injected-after-write", Injected)
def _attach_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(devices_mod, "_attach_row", after(devices_mod._attach_row))
    attach(tx, "0000:00:1f.0", w.a, owner="new")


case(BOOT1, "attach-bad-bdf", InvalidArgument)(lambda tx, w, mp: attach(tx, "nonsense", w.a))
case(BOOT1, "attach-to-preserved-domain", NotPermitted)(lambda tx, w, mp: attach(tx, "0000:00:1f.0", w.q))
case(BOOT1, "detach-wrong-owner", NotPermitted)(lambda tx, w, mp: detach(tx, DEV_A, owner="intruder"))
case(BOOT1, "detach-preserved", Busy)(lambda tx, w, mp: detach(tx, DEV_P, owner=OWNER))


# -- boot 2 -----------------------------------------------------------------------------------------
@case(BOOT2, "retrieve-injected", Injected)
def _retrieve_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    inject_at(mp, sessions_mod, "session_retrieve")
    retrieve_session(tx, SESSION3)


case(BOOT2, "retrieve-twice", InvalidArgument)(lambda tx, w, mp: retrieve_session(tx, SESSION2))
case(BOOT2, "restore-before-retrieve", NotPermitted)(lambda tx, w, mp: restore_domain(tx, TOKEN_S))


@case(BOOT2, "restore-injected-at-restore", Injected)
def _restore_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    inject_at(mp, iommu_mod, "restore")
    restore_domain(tx, TOKEN_Q)


@case(BOOT2, "restore-injected-after-reattach", Injected)
def _restore_reattach_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(sessions_mod, "reattach_devices", after(sessions_mod.reattach_devices))
    restore_domain(tx, TOKEN_P)


case(BOOT2, "restore-twice", AlreadyExists)(lambda tx, w, mp: restore_domain(tx, TOKEN_R))
case(BOOT2, "restore-unknown-token", NotFound)(lambda tx, w, mp: restore_domain(tx, 0x12345))
case(BOOT2, "restore_pages-not-preserved", NotFound)(lambda tx, w, mp: restore_pages(tx, [(0x3000, 0)]))
case(BOOT2, "finish-device-busy", Busy)(lambda tx, w, mp: finish_session(tx, SESSION))


@case(BOOT2, "replace-injected", Injected)
def _replace_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    inject_at(mp, devices_mod, "device_replace")
    replace(tx, DEV_R, w.n, owner=OWNER)


@case(BOOT2, "replace-then-free-injected", Injected)
def _replace_free_injected(tx: Transaction, w: World, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(Domain, "set_state", after(Domain.set_state))
    replace(tx, DEV_R, w.n, owner=OWNER)


case(BOOT2, "replace-wrong-owner", NotPermitted)(lambda tx, w, mp: replace(tx, DEV_R, w.n, owner="intruder"))
case(BOOT2, "map-old-boot-domain", NotPermitted)(lambda tx, w, mp: get_domain(tx, w.q).map_range(0, 0, 0x1000))


def _fails_and_leaves_nothing(w: World, machine: str, fn: Case, exc: type[BaseException], mp: Any) -> None:
    before = dump(w.store)
    m = w.machine(machine)
    with m.transaction(write=False) as tx:
        frames_before = frame_counts(tx)
    with m.transaction() as tx:
        listed = list_domains(tx, include_freed=True)  # caches are warm, as in a real caller
        with pytest.raises(exc):
            fn(tx, w, mp)
        mp.undo()
        # the caller goes on in the same transaction and sees the state from before the call
        assert frame_counts(tx) == frames_before
        assert list_domains(tx, include_freed=True) == listed
    assert dump(w.store) == before
    assert fsck_problems(w.store) == []


@pytest.mark.parametrize("name", list(BOOT1))
def test_boot1_call_fails_and_leaves_nothing(boot1: World, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    machine, fn, exc = BOOT1[name]
    _fails_and_leaves_nothing(boot1, machine, fn, exc, monkeypatch)


@pytest.mark.parametrize("name", list(BOOT2))
def test_boot2_call_fails_and_leaves_nothing(boot2: World, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    machine, fn, exc = BOOT2[name]
    _fails_and_leaves_nothing(boot2, machine, fn, exc, monkeypatch)


def test_the_original_report(store: Store) -> None:
    """A failed domain_alloc inside a transaction that is then committed leaves no half-made domain."""
    store.create_machine("m", 64 << 20)
    m = store.machine("m")
    with m.transaction() as tx, pytest.raises(NotSupported):
        domain_alloc(tx, "x86_64", top_level=9)
    with m.transaction(write=False) as tx:
        assert list_domains(tx, include_freed=True) == []
        assert fsck(tx).problems == []


# -- the transaction goes on correctly after a failed call ---------------------------------------------
def _without_times(d: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    import datetime as dt

    return {
        t: [tuple(None if isinstance(v, dt.datetime | str) and _is_time(v) else v for v in r) for r in rows]
        for t, rows in d.items()
    }


def _is_time(v: Any) -> bool:
    import datetime as dt

    if isinstance(v, dt.datetime):
        return True
    try:
        dt.datetime.fromisoformat(v)
    except ValueError:
        return False
    return len(v) >= 19


def _same_work(tmp_path: Path, work: Callable[[Transaction, bool], None]) -> None:
    """``work(tx, with_failures)`` in two fresh stores, with and without failing calls in between:
    the stores end up identical (timestamps aside), and fsck is clean."""
    dumps = []
    for with_failures in (False, True):
        with Store.init(tmp_path / f"s{with_failures}.db") as store:
            store.create_machine("m", 2 << 20)
            with store.machine("m").transaction() as tx:
                work(tx, with_failures)
            dumps.append(_without_times(dump(store)))
            assert fsck_problems_one(store) == []
    assert dumps[0] == dumps[1]


def fsck_problems_one(store: Store) -> list[str]:
    with store.machine("m").transaction(write=False) as tx:
        return fsck(tx).problems


def test_maps_after_failed_maps_match_a_clean_run(tmp_path: Path) -> None:
    def work(tx: Transaction, fail: bool) -> None:
        a = domain_alloc(tx, "amdv1")
        a.map_range(0x1000, 0x200000, 0x4000)
        if fail:
            with pytest.raises(AddressInUse):  # overlaps, after placing 0x0
                a.map_range(0x0, 0x1000000, 0x3000)
            with pytest.raises(OutOfMemory):  # grows the top and allocates tables, then runs out
                a.map_range(1 << 56, 0x1000, 2 << 30)
            with pytest.raises(IommuptError):
                domain_alloc(tx, "riscv", vasz=40)
        a.map_range(0x100000, 0x300000, 0x200000)
        b = domain_alloc(tx, "vtdss")
        b.map_range(0x40000000, 0x80000000, 0x201000)
        if fail:
            with pytest.raises(IommuptError):
                b.map_range(0x40000000, 0x80000000, 0x1000)
        assert a.unmap_range(0x1000, 0x1000) == 0x1000
        assert b.iova_to_phys(0x40200000) == 0x80200000

    _same_work(tmp_path, work)


def test_free_after_failed_free_matches_a_clean_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def work(tx: Transaction, fail: bool) -> None:
        a = domain_alloc(tx, "x86_64")
        a.map_range(0, 0x100001000, 3 << 20)
        if fail:
            with monkeypatch.context() as mp:
                mp.setattr(Domain, "set_state", after(Domain.set_state))
                with pytest.raises(Injected):
                    a.free()
            assert a.state == "live" and a.iova_to_phys(0x2000) == 0x100003000
        assert a.free() > 0
        domain_alloc(tx, "x86_64").map_range(0, 0x1000, 0x1000)

    _same_work(tmp_path, work)


def _count_flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Pages written by each ``Memory.flush`` from now on."""
    from iommupt_store.memory import Memory

    written: list[int] = []
    real = Memory.flush

    def flush(self: Memory) -> int:
        written.append(real(self))
        return written[-1]

    monkeypatch.setattr(Memory, "flush", flush)
    return written


def test_pages_are_written_once_per_transaction(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """All or nothing costs no page writes: calls keep an undo log instead of flushing before they start."""
    store.create_machine("m", 64 << 20)
    m = store.machine("m")
    written = _count_flushes(monkeypatch)
    with m.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
    assert written == [1]  # the top table, at commit
    written.clear()
    with m.transaction() as tx:
        get_domain(tx, dom.id).map_range(0, 0x100001000, 1 << 30)
    assert written == [515]  # the top (updated), L2, L1 and 512 L0 tables (inserted)
    written.clear()
    with m.transaction() as tx:
        d = get_domain(tx, dom.id)
        for i in range(100):
            d.map_range((2 << 30) + (i << 12), 0x1000, 0x1000)
        with pytest.raises(AddressInUse):
            d.map_range(0, 0x1000, 0x1000)
        d.unmap_range(2 << 30, 0x1000)
    assert written == [4]  # each table the 102 calls touched, once, at commit


def test_nested_calls_share_the_outer_savepoint(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call made from inside another (restore_domain calls domain_alloc) shares its savepoint and undo
    log; a failure anywhere undoes the outer call whole."""
    store.create_machine("m", 64 << 20)
    m = store.machine("m")
    written = _count_flushes(monkeypatch)
    with m.transaction() as tx:
        with tx.atomic():
            domain_alloc(tx, "x86_64").map_range(0, 0, 0x1000)
        with pytest.raises(Injected), tx.atomic():
            domain_alloc(tx, "vtdss").map_range(0, 0, 0x1000)
            raise Injected("after two inner calls")
        assert written == []
    assert written == [4]
    with m.transaction(write=False) as tx:
        assert [d.format for d in list_domains(tx, include_freed=True)] == ["x86_64"]
