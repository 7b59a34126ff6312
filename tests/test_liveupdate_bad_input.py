"""Bad input to live update: every case is a clear error and leaves the database as it was.

Each case tampers with the stored state through plain SQL where it needs to (a
descriptor field, a frame's bytes with or without its preservation hash, a
preservation row), then takes a logical dump of every table, runs the operation,
checks the error's class and errno name, and compares a second dump with the
first. The world:

* boot N (``boot_n``): domain A (x86_64, 4 levels, sign-extended: a 4K run, the
  test_mixed range and an upper-half range) preserved under ``TOKEN_A``; domain
  B (vtdss) preserved under ``TOKEN_B``; domain C (amdv1) live; page P (a plain
  page, not a table) preserved by ``"test"``; an order-1 block Q preserved by
  ``"test"``; page R allocated, not preserved.
* boot N+1 (``boot_n1``): the same after ``liveupdate``; page S is allocated in
  boot N+1 and was never preserved.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iommupt_store.abi.catalogue import SERIES_COMPATIBLE
from iommupt_store.domains import domain_alloc, get_domain, hardware_walker
from iommupt_store.errors import (
    AlreadyExists,
    BadData,
    InvalidArgument,
    IommuptError,
    NotFound,
    NotPermitted,
)
from iommupt_store.formats import EntryType, get_format
from iommupt_store.liveupdate import (
    SealRefused,
    liveupdate,
    preserve_domain,
    preserve_pages,
    restore_domain,
    restore_pages,
    unpreserve_domain,
    unpreserve_pages,
)
from iommupt_store.machine import Machine, Transaction
from iommupt_store.store import Store
from tests.conftest import RunCli, integrity, one_error_line, sql, sqlite_dump

MACHINE = "lu"
TOKEN_A, TOKEN_B = 0xA, 0xB
UNUSED_TOKEN = 0xDEAD
SE_UPPER = 0xFFFF800000000000
#: well inside the 64 MiB machine, far above anything the world allocates
UNALLOCATED_PFN = 0x3F00


# =========================================================================== the world


@dataclass
class World:
    db: Path
    store: Store
    a: int
    b: int
    c: int
    p: int
    q: int
    r: int
    #: allocated in boot N+1 (``boot_n1``), never preserved
    s: int = 0

    def machine(self) -> Machine:
        return self.store.machine(MACHINE)

    def tx(self, fn: Callable[[Transaction], Any]) -> Any:
        with self.machine().transaction() as tx:
            return fn(tx)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        return sql(self.db, query, *params)

    # -- frames of a domain ---------------------------------------------------------------
    def top_pfn(self, dom: int) -> int:
        return int(self.sql("SELECT top_phys FROM domain WHERE id = ?", dom)[0][0]) >> 12

    def tables(self, dom: int, level: int) -> list[int]:
        rows = self.sql("SELECT pfn FROM page WHERE domain_id = ? AND level = ? ORDER BY pfn", dom, level)
        return [p for (p,) in rows]

    def words(self, pfn: int) -> list[int]:
        (data,) = self.sql("SELECT contents FROM page WHERE pfn = ?", pfn)[0]
        return list(struct.unpack("<512Q", data))

    def set_word(self, pfn: int, index: int, raw: int, *, fix_hash: bool) -> None:
        """Write one u64 of a frame; with ``fix_hash`` also re-hash its preservation record."""
        words = self.words(pfn)
        words[index] = raw
        data = struct.pack("<512Q", *words)
        self.sql("UPDATE page SET contents = ? WHERE pfn = ?", data, pfn)
        if fix_hash:
            self.sql("UPDATE preservation SET content_hash = ? WHERE pfn = ?", hashlib.sha256(data).hexdigest(), pfn)

    def table_entry(self, dom: int, pfn: int, level: int) -> tuple[int, int]:
        """(index, child pfn) of the first entry of table ``pfn`` that points to a lower table."""
        fmt = get_format(self.sql("SELECT format FROM domain WHERE id = ?", dom)[0][0])
        for i, raw in enumerate(self.words(pfn)):
            if raw:
                d = fmt.decode(raw, level, frozenset())
                if d.type is EntryType.TABLE:
                    return i, d.addr >> 12
        raise AssertionError(f"table {pfn:#x} has no table entry")

    def leaf(self, dom: int, level: int) -> tuple[int, int]:
        """(table pfn, index) of the first entry of a level-``level`` table that maps a page."""
        fmt = get_format(self.sql("SELECT format FROM domain WHERE id = ?", dom)[0][0])
        for pfn in self.tables(dom, level):
            for i, raw in enumerate(self.words(pfn)):
                if raw and fmt.decode(raw, level, frozenset()).type is EntryType.OA:
                    return pfn, i
        raise AssertionError(f"domain {dom} maps nothing at level {level}")

    def empty_index(self, pfn: int) -> int:
        return max(i for i, raw in enumerate(self.words(pfn)) if raw == 0)

    def set_descriptor(self, token: int, path: str, value: Any) -> None:
        self.sql(
            "UPDATE handover_entry SET descriptor = json_set(descriptor, ?, json(?)) WHERE token = ?",
            path,
            json.dumps(value),
            token,
        )

    def descriptor(self, token: int) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.sql("SELECT descriptor FROM handover_entry WHERE token = ?", token)[0][0])
        return doc


@pytest.fixture
def boot_n(lu_db: Path) -> Iterator[World]:
    store = Store(lu_db)
    m = store.machine(MACHINE)
    with m.transaction() as tx:
        a = domain_alloc(tx, "x86_64", top_level=3, vasz=48)
        a.map_range(0x40000000, 0x80001000, 4 << 20)
        a.map_range(0x3FE400000, 0x3FE400000, 0xC2200000)
        a.map_range(SE_UPPER, 0x200000, 8 << 20)
        b = domain_alloc(tx, "vtdss")
        b.map_range(0x40000000, 0x80001000, 2 << 20)
        c = domain_alloc(tx, "amdv1")
        c.map_range(0x10000, 0x10000, 0x30000)
        mem = tx.memory
        p = mem.alloc("test")
        mem.write(p, b"not a page table" * 8)
        q = mem.alloc("test", order=1)
        r = mem.alloc("test")
        preserve_domain(tx, a.id, TOKEN_A)
        preserve_domain(tx, b.id, TOKEN_B)
        preserve_pages(tx, [(p, 0), (q, 1)], "test")
        world = World(lu_db, store, a.id, b.id, c.id, p, q, r)
    try:
        yield world
    finally:
        store.close()


@pytest.fixture
def boot_n1(boot_n: World) -> World:
    liveupdate(boot_n.machine())
    boot_n.s = boot_n.tx(lambda tx: tx.memory.alloc("scratch"))  # starts boot N+1
    assert boot_n.machine().boot_number == 2
    return boot_n


def refused(
    w: World, fn: Callable[[], Any], cls: type[IommuptError], errno_name: str, match: str | None = None
) -> None:
    """``fn`` raises ``cls`` with ``errno_name``, and every table is exactly as before."""
    before = sqlite_dump(w.db)
    with pytest.raises(cls, match=match) as info:
        fn()
    assert info.value.errno_name == errno_name
    assert str(info.value).startswith(errno_name)
    assert sqlite_dump(w.db) == before


def restore_refused(
    w: World, cls: type[IommuptError] = BadData, errno_name: str = "EBADMSG", match: str | None = None
) -> None:
    refused(w, lambda: w.tx(lambda tx: restore_domain(tx, TOKEN_A)), cls, errno_name, match)
    # the refusal changed nothing: DMA still goes through the preserved tables of A
    with w.machine().transaction(write=False) as tx:
        assert get_domain(tx, w.a).state == "preserved"


# =========================================================================== descriptors tampered in boot N+1

DESCRIPTOR_CASES: dict[str, tuple[Callable[[World], tuple[str, Any]], str]] = {
    # field -> (value from the world, what the error says)
    "top_phys-unpreserved-page": (lambda w: ("$.top_table_phys", hex(w.s << 12)), "not preserved"),
    "top_phys-unallocated": (lambda w: ("$.top_table_phys", hex(UNALLOCATED_PFN << 12)), "not a page"),
    "top_phys-non-table-page": (lambda w: ("$.top_table_phys", hex(w.p << 12)), "not preserved"),
    "top_phys-other-domain": (lambda w: ("$.top_table_phys", hex(w.top_pfn(w.b) << 12)), "not preserved"),
    "top_phys-own-lower-table": (lambda w: ("$.top_table_phys", hex(w.tables(w.a, 2)[0] << 12)), "level-3"),
    "top_phys-not-hex": (lambda w: ("$.top_table_phys", "0xZZZ000"), "hex"),
    "top_phys-no-prefix": (lambda w: ("$.top_table_phys", str(w.top_pfn(w.a) << 12)), "hex"),
    "top_phys-too-long": (lambda w: ("$.top_table_phys", "0x" + "1" * 17 + "000"), "hex"),
    "top_phys-unaligned": (lambda w: ("$.top_table_phys", hex((w.top_pfn(w.a) << 12) + 0x800)), "multiple of 4096"),
    "top_phys-negative": (lambda w: ("$.top_table_phys", -4096), "must be a hex string"),
    "top_phys-integer": (lambda w: ("$.top_table_phys", 4096), "must be a hex string"),
    "top_level-6": (lambda w: ("$.top_level", 6), "top_level"),
    "top_level-above-format-max": (lambda w: ("$.top_level", 5), "exceeds"),
    "top_level-mismatched": (lambda w: ("$.top_level", 2), "vasz"),
    "top_level-string": (lambda w: ("$.top_level", "3"), "top_level"),
    "vasz-65": (lambda w: ("$.vasz", 65), "vasz"),
    "vasz-11": (lambda w: ("$.vasz", 11), "vasz"),
    "vasz-too-wide-for-level": (lambda w: ("$.vasz", 49), "does not fit"),
    "vasz-too-narrow-for-level": (lambda w: ("$.vasz", 39), "does not fit"),
    "version-2": (lambda w: ("$.version", 2), "version"),
    "version-0": (lambda w: ("$.version", 0), "version"),
    "compatible-in-descriptor": (lambda w: ("$.compatible", "iommu-liveupdate-v2"), "compatible"),
    "extra-field": (lambda w: ("$.next_table_phys", "0x1000"), "next_table_phys"),
    "format-unknown": (lambda w: ("$.format", "mock"), "format"),
    "flags-deleted": (lambda w: ("$.flags", 1), "DELETED"),
    "flags-unknown-bit": (lambda w: ("$.flags", 4), "flags"),
    "ref_count-negative": (lambda w: ("$.ref_count", -1), "ref_count"),
    "sign_extend-not-bool": (lambda w: ("$.sign_extend", "yes"), "sign_extend"),
}


@pytest.mark.parametrize("case", list(DESCRIPTOR_CASES))
def test_restore_refuses_tampered_descriptor(boot_n1: World, case: str) -> None:
    make, match = DESCRIPTOR_CASES[case]
    path, value = make(boot_n1)
    boot_n1.set_descriptor(TOKEN_A, path, value)
    assert boot_n1.descriptor(TOKEN_A)[path[2:]] == value
    restore_refused(boot_n1, match=match)


def test_restore_refuses_missing_field(boot_n1: World) -> None:
    boot_n1.sql("UPDATE handover_entry SET descriptor = json_remove(descriptor, '$.vasz') WHERE token = ?", TOKEN_A)
    restore_refused(boot_n1, match="vasz")


def test_restore_refuses_descriptor_that_is_not_an_object(boot_n1: World) -> None:
    boot_n1.sql("UPDATE handover_entry SET descriptor = json('[1, 2, 3]') WHERE token = ?", TOKEN_A)
    restore_refused(boot_n1)


def test_restore_refuses_sign_extend_on_a_format_without_it(boot_n1: World) -> None:
    boot_n1.set_descriptor(TOKEN_B, "$.sign_extend", True)
    refused(boot_n1, lambda: boot_n1.tx(lambda tx: restore_domain(tx, TOKEN_B)), BadData, "EBADMSG", "sign")


def test_restore_refuses_wrong_compatible_column(boot_n1: World) -> None:
    boot_n1.sql("UPDATE handover_entry SET compatible = 'iommu-liveupdate-v0' WHERE token = ?", TOKEN_A)
    restore_refused(boot_n1, match="no handler")


def test_restore_refuses_entry_without_domain(boot_n1: World) -> None:
    boot_n1.sql("UPDATE handover_entry SET domain_id = NULL WHERE token = ?", TOKEN_A)
    restore_refused(boot_n1, match="names no domain")


def test_restore_refuses_narrowed_vasz(boot_n1: World) -> None:
    """vasz 40 fits a level-3 top, but the walk would then miss the upper half's preserved tables."""
    boot_n1.set_descriptor(TOKEN_A, "$.vasz", 40)
    restore_refused(boot_n1, match="does not reach")


def test_restore_refuses_another_format(boot_n1: World) -> None:
    """A's x86_64 tables described as vtdss: the new kernel would decode them with the wrong format."""
    boot_n1.set_descriptor(TOKEN_A, "$.format", "vtdss")
    boot_n1.set_descriptor(TOKEN_A, "$.sign_extend", False)
    restore_refused(boot_n1, match="format")


def test_restore_refuses_cleared_sign_extend(boot_n1: World) -> None:
    """A maps the upper half: without sign extension the restored domain would translate other IOVAs."""
    boot_n1.set_descriptor(TOKEN_A, "$.sign_extend", False)
    restore_refused(boot_n1, match="sign")


# =========================================================================== frames tampered


def test_restore_refuses_changed_frame_bytes(boot_n1: World) -> None:
    """After the seal, in boot N+1: a frame's bytes no longer match the hash taken at preserve."""
    w = boot_n1
    lvl1, i = w.leaf(w.a, 1)
    w.set_word(lvl1, i, w.words(lvl1)[i] ^ (1 << 32), fix_hash=False)  # a 2M leaf now maps elsewhere
    restore_refused(w, match="changed after it was preserved")


def _entry_pointing_to(w: World, target_pfn: int, level: int) -> int:
    return get_format("x86_64").encode_table(target_pfn << 12, level, frozenset())


@pytest.mark.parametrize(
    "case",
    ["cycle-to-top", "into-other-domain", "shared-table", "wrong-level", "unpreserved-page", "non-table-page"],
)
def test_restore_refuses_bad_table_pointer(boot_n1: World, case: str) -> None:
    """A table entry pointing where it must not; bytes AND hash tampered: only the structure tells."""
    w = boot_n1
    top = w.top_pfn(w.a)
    lvl2 = w.tables(w.a, 2)[0]
    slot = w.empty_index(lvl2)
    if case == "shared-table":
        index, _ = w.table_entry(w.a, top, 3)
        w.set_word(top, w.empty_index(top), w.words(top)[index], fix_hash=True)
    else:
        target = {
            "cycle-to-top": top,
            "into-other-domain": w.tables(w.b, 1)[0],
            "wrong-level": w.tables(w.a, 0)[0],
            "unpreserved-page": w.s,
            "non-table-page": w.p,
        }[case]
        w.set_word(lvl2, slot, _entry_pointing_to(w, target, 2), fix_hash=True)
    restore_refused(w)


def test_restore_refuses_missing_preservation_of_a_lower_table(boot_n1: World) -> None:
    w = boot_n1
    w.sql("DELETE FROM preservation WHERE pfn = ?", w.tables(w.a, 0)[0])
    restore_refused(w, match="not preserved")


def test_restore_refuses_frame_of_wrong_order(boot_n1: World) -> None:
    w = boot_n1
    w.sql("UPDATE preservation SET page_order = 1 WHERE pfn = ?", w.tables(w.a, 1)[0])
    restore_refused(w, BadData, "EBADMSG", "order")


# =========================================================================== restore sequencing


def test_restore_unknown_token(boot_n1: World) -> None:
    refused(boot_n1, lambda: boot_n1.tx(lambda tx: restore_domain(tx, UNUSED_TOKEN)), NotFound, "ENOENT")


def test_double_restore(boot_n1: World) -> None:
    w = boot_n1
    restored = w.tx(lambda tx: restore_domain(tx, TOKEN_A).id)
    refused(w, lambda: w.tx(lambda tx: restore_domain(tx, TOKEN_A)), AlreadyExists, "EEXIST", str(restored))


def test_restore_in_boot_n_plus_2(boot_n1: World) -> None:
    w = boot_n1
    liveupdate(w.machine())  # boot N+1 hands nothing over
    assert w.machine().boot_number == 3
    refused(w, lambda: w.tx(lambda tx: restore_domain(tx, TOKEN_A)), NotFound, "ENOENT", "older boot")


def test_restore_after_cold_reboot(boot_n: World) -> None:
    w = boot_n
    w.machine().reboot(cold=True)
    assert w.machine().boot_number == 2
    refused(w, lambda: w.tx(lambda tx: restore_domain(tx, TOKEN_A)), NotFound, "ENOENT", "cold")


def test_restore_in_the_first_boot(boot_n: World) -> None:
    refused(boot_n, lambda: boot_n.tx(lambda tx: restore_domain(tx, TOKEN_A)), NotFound, "ENOENT", "first")


# =========================================================================== preserve / unpreserve, boot N


def test_preserve_already_preserved_domain(boot_n: World) -> None:
    w = boot_n
    refused(w, lambda: w.tx(lambda tx: preserve_domain(tx, w.a, 0x99)), AlreadyExists, "EEXIST", "already preserved")


def test_preserve_with_duplicate_token(boot_n: World) -> None:
    w = boot_n
    refused(w, lambda: w.tx(lambda tx: preserve_domain(tx, w.c, TOKEN_A)), AlreadyExists, "EEXIST", "token")


@pytest.mark.parametrize("token", [-1, 1 << 64])
def test_preserve_with_token_out_of_u64(boot_n: World, token: int) -> None:
    w = boot_n
    refused(w, lambda: w.tx(lambda tx: preserve_domain(tx, w.c, token)), InvalidArgument, "EINVAL", "u64")


def test_preserve_unknown_domain(boot_n: World) -> None:
    refused(boot_n, lambda: boot_n.tx(lambda tx: preserve_domain(tx, 999, 0x99)), NotFound, "ENOENT")


def test_preserve_freed_domain(boot_n: World) -> None:
    w = boot_n
    w.tx(lambda tx: get_domain(tx, w.c).free())
    refused(w, lambda: w.tx(lambda tx: preserve_domain(tx, w.c, 0x99)), NotFound, "ENOENT", "freed")


@pytest.mark.parametrize("op", ["map", "unmap"])
def test_map_unmap_on_preserved_domain(boot_n: World, op: str) -> None:
    w = boot_n

    def run(tx: Transaction) -> Any:
        dom = get_domain(tx, w.a)
        return dom.map_range(0x1000, 0x1000, 0x1000) if op == "map" else dom.unmap_range(0x40000000, 0x1000)

    refused(w, lambda: w.tx(run), NotPermitted, "EPERM", "preserved")


def test_free_of_preserved_domain(boot_n: World) -> None:
    w = boot_n
    refused(w, lambda: w.tx(lambda tx: get_domain(tx, w.a).free()), NotPermitted, "EPERM", "unpreserve")


def test_unpreserve_never_preserved_token(boot_n: World) -> None:
    refused(boot_n, lambda: boot_n.tx(lambda tx: unpreserve_domain(tx, UNUSED_TOKEN)), NotFound, "ENOENT")


def test_unpreserve_previous_boots_token(boot_n1: World) -> None:
    refused(boot_n1, lambda: boot_n1.tx(lambda tx: unpreserve_domain(tx, TOKEN_A)), NotFound, "ENOENT")


# =========================================================================== the seal


def _seal_refused(w: World, match: str | None = None) -> None:
    m = w.machine()
    refused(w, lambda: liveupdate(m), SealRefused, "EBADMSG", match)
    # the boot did not end: the same process carries on in boot N
    assert w.sql("SELECT number, end_kind FROM boot") == [(1, None)]
    with m.transaction() as tx:
        assert get_domain(tx, w.b).state == "preserved"


def test_seal_refused_when_frame_bytes_changed(boot_n: World) -> None:
    w = boot_n
    lvl1, i = w.leaf(w.a, 1)
    w.set_word(lvl1, i, w.words(lvl1)[i] ^ (1 << 32), fix_hash=False)
    _seal_refused(w, "changed after preserve")


def test_seal_refused_when_a_preservation_is_missing(boot_n: World) -> None:
    w = boot_n
    w.sql("DELETE FROM preservation WHERE pfn = ?", w.tables(w.a, 0)[-1])
    _seal_refused(w, "unpreserved frame")


def test_seal_refused_when_a_frame_was_added(boot_n: World) -> None:
    """Tamper the state to 'live', map a range that needs new tables, put 'preserved' back."""
    w = boot_n
    w.sql("UPDATE domain SET state = 'live' WHERE id = ?", w.a)
    w.tx(lambda tx: get_domain(tx, w.a).map_range(1 << 40, 0x1000, 0x1000))
    w.sql("UPDATE domain SET state = 'preserved' WHERE id = ?", w.a)
    _seal_refused(w, "unpreserved frame")


def test_seal_refused_when_descriptor_no_longer_matches(boot_n: World) -> None:
    boot_n.set_descriptor(TOKEN_A, "$.vasz", 47)
    _seal_refused(boot_n, "no longer matches")


def test_seal_refused_when_domain_is_not_preserved(boot_n: World) -> None:
    boot_n.sql("UPDATE domain SET state = 'live' WHERE id = ?", boot_n.a)
    _seal_refused(boot_n, "not preserved")


def test_seal_refused_on_a_cycle(boot_n: World) -> None:
    w = boot_n
    lvl2 = w.tables(w.a, 2)[0]
    w.set_word(lvl2, w.empty_index(lvl2), _entry_pointing_to(w, w.top_pfn(w.a), 2), fix_hash=True)
    _seal_refused(w)


# =========================================================================== domains across the boot


@pytest.mark.parametrize("op", ["map", "unmap", "iova_to_phys", "preserve"])
def test_restored_domain_accepts_only_free(boot_n1: World, op: str) -> None:
    w = boot_n1
    new = w.tx(lambda tx: restore_domain(tx, TOKEN_A).id)

    def run(tx: Transaction) -> Any:
        dom = get_domain(tx, new)
        if op == "map":
            return dom.map_range(0x1000, 0x1000, 0x1000)
        if op == "unmap":
            return dom.unmap_range(0x40000000, 0x1000)
        if op == "iova_to_phys":
            return dom.iova_to_phys(0x40000000)
        return preserve_domain(tx, new, 0x99)

    refused(w, lambda: w.tx(run), NotPermitted, "EPERM", "restored")


@pytest.mark.parametrize("op", ["map", "unmap", "free", "preserve"])
def test_previous_boots_domain_is_not_this_kernels(boot_n1: World, op: str) -> None:
    """Before restore, A is the old kernel's object: only restore may take it over."""
    w = boot_n1

    def run(tx: Transaction) -> Any:
        dom = get_domain(tx, w.a)
        if op == "map":
            return dom.map_range(0x1000, 0x1000, 0x1000)
        if op == "unmap":
            return dom.unmap_range(0x40000000, 0x1000)
        if op == "free":
            return dom.free()
        return preserve_domain(tx, w.a, 0x99)

    refused(w, lambda: w.tx(run), NotPermitted, "EPERM")


# =========================================================================== KHO pages


def test_kho_preserve_unallocated_pfn(boot_n: World) -> None:
    w = boot_n
    pages = [(w.r, 0), (UNALLOCATED_PFN, 0)]
    refused(w, lambda: w.tx(lambda tx: preserve_pages(tx, pages, "test")), InvalidArgument, "EINVAL", "not allocated")


@pytest.mark.parametrize("which", ["order-0-of-a-block", "order-1-of-a-page"])
def test_kho_preserve_wrong_order(boot_n: World, which: str) -> None:
    w = boot_n
    page = (w.q, 0) if which == "order-0-of-a-block" else (w.r, 1)
    refused(w, lambda: w.tx(lambda tx: preserve_pages(tx, [page], "test")), InvalidArgument, "EINVAL", "order")


def test_kho_preserve_same_pfn_twice(boot_n: World) -> None:
    w = boot_n
    pages = [(w.r, 0), (w.r, 0)]
    refused(w, lambda: w.tx(lambda tx: preserve_pages(tx, pages, "test")), InvalidArgument, "EINVAL", "twice")


def test_kho_preserve_already_preserved(boot_n: World) -> None:
    w = boot_n
    pages = [(w.r, 0), (w.p, 0)]  # R would be new: it must not be left preserved either
    refused(w, lambda: w.tx(lambda tx: preserve_pages(tx, pages, "other")), AlreadyExists, "EEXIST", "already")


def test_kho_unpreserve_by_another_owner(boot_n: World) -> None:
    w = boot_n
    refused(w, lambda: w.tx(lambda tx: unpreserve_pages(tx, [(w.p, 0)], "other")), NotPermitted, "EPERM", "test")


def test_kho_unpreserve_a_domains_frame(boot_n: World) -> None:
    w = boot_n
    top = w.top_pfn(w.a)
    refused(w, lambda: w.tx(lambda tx: unpreserve_pages(tx, [(top, 0)], "test")), NotPermitted, "EPERM", "domain")


def test_kho_unpreserve_wrong_order(boot_n: World) -> None:
    w = boot_n
    refused(w, lambda: w.tx(lambda tx: unpreserve_pages(tx, [(w.q, 0)], "test")), InvalidArgument, "EINVAL", "order")


def test_kho_unpreserve_never_preserved_drops_nothing(boot_n: World) -> None:
    """P is preserved and listed first: the call fails on R and P's record must survive."""
    w = boot_n
    pages = [(w.p, 0), (w.r, 0)]
    refused(w, lambda: w.tx(lambda tx: unpreserve_pages(tx, pages, "test")), NotFound, "ENOENT", "never preserved")
    assert w.sql("SELECT preserved_by FROM preservation WHERE pfn = ?", w.p) == [("test",)]


def test_kho_restore_pages_preserved_two_boots_ago(boot_n1: World) -> None:
    w = boot_n1
    liveupdate(w.machine())  # boot N+1 does not preserve P again
    assert w.machine().boot_number == 3
    refused(w, lambda: w.tx(lambda tx: restore_pages(tx, [(w.p, 0)], "test")), NotFound, "ENOENT")


@pytest.mark.parametrize(
    ("case", "cls", "errno_name"),
    [
        ("wrong-order", InvalidArgument, "EINVAL"),
        ("wrong-owner", NotPermitted, "EPERM"),
        ("twice", AlreadyExists, "EEXIST"),
        ("bytes-changed", BadData, "EBADMSG"),
        ("never-preserved", NotFound, "ENOENT"),
    ],
)
def test_kho_restore_pages_refused(boot_n1: World, case: str, cls: type[IommuptError], errno_name: str) -> None:
    w = boot_n1
    pages, who = [(w.q, 1)], "test"
    if case == "wrong-order":
        pages = [(w.q, 0)]
    elif case == "wrong-owner":
        who = "other"
    elif case == "twice":
        w.tx(lambda tx: restore_pages(tx, [(w.q, 1)], "test"))
    elif case == "bytes-changed":
        w.sql("UPDATE page SET contents = ? WHERE pfn = ?", b"\x01" * 8192, w.q)
    else:
        pages = [(w.q, 1), (w.s, 0)]
    refused(w, lambda: w.tx(lambda tx: restore_pages(tx, pages, who)), cls, errno_name)


# =========================================================================== the command line


def test_cli_restore_tampered_descriptor(boot_n1: World, run_cli: RunCli) -> None:
    w = boot_n1
    w.set_descriptor(TOKEN_A, "$.version", 2)
    before = sqlite_dump(w.db)
    proc = run_cli("--machine", MACHINE, "restore", "--token", hex(TOKEN_A), db=w.db)
    assert proc.returncode == 65
    assert "EBADMSG" in one_error_line(proc.stderr)
    assert proc.stdout == ""
    assert sqlite_dump(w.db) == before


def test_cli_restore_unknown_token(boot_n1: World, run_cli: RunCli) -> None:
    before = sqlite_dump(boot_n1.db)
    proc = run_cli("--machine", MACHINE, "restore", "--token", hex(UNUSED_TOKEN), db=boot_n1.db)
    assert proc.returncode == 1
    assert "ENOENT" in one_error_line(proc.stderr)
    assert sqlite_dump(boot_n1.db) == before


def test_cli_double_restore(boot_n1: World, run_cli: RunCli) -> None:
    first = run_cli("--machine", MACHINE, "restore", "--token", hex(TOKEN_A), "--json", db=boot_n1.db)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["state"] == "restored"
    before = sqlite_dump(boot_n1.db)
    proc = run_cli("--machine", MACHINE, "restore", "--token", hex(TOKEN_A), db=boot_n1.db)
    assert proc.returncode == 1
    assert "EEXIST" in one_error_line(proc.stderr)
    assert sqlite_dump(boot_n1.db) == before


def test_cli_preserve_duplicate_token(boot_n: World, run_cli: RunCli) -> None:
    before = sqlite_dump(boot_n.db)
    proc = run_cli("--machine", MACHINE, "preserve", str(boot_n.c), "--token", hex(TOKEN_B), db=boot_n.db)
    assert proc.returncode == 1
    assert "EEXIST" in one_error_line(proc.stderr)
    assert sqlite_dump(boot_n.db) == before


def test_cli_unpreserve_never_preserved(boot_n: World, run_cli: RunCli) -> None:
    before = sqlite_dump(boot_n.db)
    proc = run_cli("--machine", MACHINE, "unpreserve", "--token", hex(UNUSED_TOKEN), db=boot_n.db)
    assert proc.returncode == 1
    assert "ENOENT" in one_error_line(proc.stderr)
    assert sqlite_dump(boot_n.db) == before


def test_cli_liveupdate_refused(boot_n: World, run_cli: RunCli) -> None:
    w = boot_n
    w.sql("DELETE FROM preservation WHERE pfn = ?", w.tables(w.a, 0)[0])
    before = sqlite_dump(w.db)
    proc = run_cli("--machine", MACHINE, "liveupdate", db=w.db)
    assert proc.returncode == 65
    assert "EBADMSG" in one_error_line(proc.stderr)
    assert sqlite_dump(w.db) == before
    assert w.sql("SELECT end_kind FROM boot") == [(None,)]


def test_nothing_here_corrupts_the_file(boot_n1: World) -> None:
    """After a refused restore of every kind above, the file is sound and restore still works."""
    w = boot_n1
    w.set_descriptor(TOKEN_A, "$.version", 2)
    restore_refused(w)
    w.set_descriptor(TOKEN_A, "$.version", 1)
    assert w.descriptor(TOKEN_A)["compatible"] == SERIES_COMPATIBLE
    new = w.tx(lambda tx: restore_domain(tx, TOKEN_A).id)
    with w.machine().transaction() as tx:
        assert hardware_walker(tx, new).translate(SE_UPPER).phys == 0x200000
        assert get_domain(tx, new).free() > 0
    assert integrity(w.db) == ("ok", [])
    assert w.sql("SELECT count(*) FROM boot WHERE end_kind IS NULL") == [(1,)]
