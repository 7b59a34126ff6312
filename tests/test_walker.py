"""The hardware walker: translations, faults and broken tables, from raw frame bytes only."""

from __future__ import annotations

import struct

import pytest

from iommupt_store.errors import BadData
from iommupt_store.formats import get_format
from iommupt_store.formats.base import Feature
from iommupt_store.pagetable.engine import PageTable
from iommupt_store.pagetable.frames import DictFrames
from iommupt_store.pagetable.walker import HardwareWalker, Leaf, TableInfo, WalkError

K4, K64, M2, G1 = 1 << 12, 1 << 16, 1 << 21, 1 << 30
UPPER48 = 0xFFFF_8000_0000_0000
SE = frozenset({Feature.SIGN_EXTEND})


def make(
    fmt: str, *, top_level: int | None = None, vasz: int | None = None, features: frozenset[Feature] = frozenset()
) -> tuple[PageTable, DictFrames]:
    frames = DictFrames()
    pt = PageTable.create(get_format(fmt), frames, top_level=top_level, hw_max_vasz_lg2=vasz, features=features)
    return pt, frames


def walker(pt: PageTable, frames: DictFrames) -> HardwareWalker:
    """A walker over a snapshot of the frames' bytes."""
    data = {phys: bytes(buf) for phys, buf in frames.frames.items()}
    return HardwareWalker(
        pt.fmt, data, top_phys=pt.top_phys, top_level=pt.top_level, vasz=pt.range_vasz(), sign_extend=pt.sign_extend
    )


def poke(frames: DictFrames, phys: int, index: int, value: int) -> None:
    """Tamper with the stored bytes: item ``index`` of the frame at ``phys`` becomes ``value``."""
    struct.pack_into("<Q", frames.frames[phys], index * 8, value)


def table_at(pt: PageTable, frames: DictFrames, iova: int, level: int) -> int:
    """The physical address of the table at ``level`` on the walk to ``iova``."""
    phys, lvl = pt.top_phys, pt.top_level
    while lvl > level:
        d = pt.fmt.decode(frames.read(phys)[pt._index(iova, lvl)], lvl, pt.features)
        phys, lvl = d.addr, lvl - 1
    return phys


# -- translations and faults ------------------------------------------------------------------------------


def test_fault_reports_the_level_of_the_faulting_table() -> None:
    pt, frames = make("x86_64", top_level=3, vasz=48, features=SE)
    t = walker(pt, frames).translate(0x1234_5000)
    assert (t.phys, t.level, t.fault) == (None, 3, "not present")  # empty top
    pt.map_range(0, 0x8000_0000, K4)
    w = walker(pt, frames)
    assert w.translate(0x123).phys == 0x8000_0123
    assert (w.translate(0).page_size, w.translate(0).level) == (K4, 0)
    for iova, level in ((K4, 0), (M2, 1), (G1, 2), (1 << 39, 3), (UPPER48, 3)):
        t = w.translate(iova)
        assert (t.phys, t.level, t.fault) == (None, level, "not present"), hex(iova)


def test_large_leaves_report_size_and_level() -> None:
    pt, frames = make("x86_64", top_level=3, vasz=48, features=SE)
    pt.map_range(G1, 0x40_0000_0000, G1)
    pt.map_range(4 * M2, 0x20_0000, M2)
    w = walker(pt, frames)
    t = w.translate(G1 + 0x1234_5678)
    assert (t.phys, t.page_size, t.level) == (0x40_1234_5678, G1, 2)
    t = w.translate(4 * M2 + 0x1F_FFFF)
    assert (t.phys, t.page_size, t.level) == (0x3F_FFFF, M2, 1)


@pytest.mark.parametrize(
    ("fmt", "top_level", "vasz", "features", "bad"),
    [
        ("x86_64", 3, 48, SE, [1 << 47, 0x0000_FFFF_FFFF_F000, 0xFFFF_7FFF_FFFF_F000, 1 << 48, 1 << 63]),
        ("x86_64", 3, 47, frozenset(), [1 << 47, UPPER48, (1 << 64) - K4]),
        ("vtdss", 2, 39, frozenset(), [1 << 39, (1 << 64) - K4]),
        ("riscv", None, 39, SE, [1 << 38, 0xFFFF_FF80_0000_0000, 0xFFFF_FFBF_FFFF_F000]),
    ],
)
def test_non_canonical_addresses_fault(
    fmt: str, top_level: int | None, vasz: int, features: frozenset[Feature], bad: list[int]
) -> None:
    pt, frames = make(fmt, top_level=top_level, vasz=vasz, features=features)
    # map the first and the last page of each half, so that only canonicality can make the walk fault
    lo, hi = pt.top_range()
    ulo, uhi = pt.upper_range()
    for va in {lo, hi + 1 - K4, ulo, uhi + 1 - K4}:
        pt.map_range(va, 0x1000_0000, K4)
    w = walker(pt, frames)
    for va in {lo, hi + 1 - K4, ulo, uhi + 1 - K4}:
        assert w.translate(va + 0x10).phys == 0x1000_0010, hex(va)
    for va in bad:
        t = w.translate(va)
        assert t.phys is None and t.fault is not None and "canonical" in t.fault, hex(va)
        assert t.level == pt.top_level


def test_amdv1_contiguous_and_riscv_napot_pages() -> None:
    pt, frames = make("amdv1", top_level=2, vasz=64)
    pt.map_range(0x1_0000, 0x7_0000, K64)  # 16 items, one entry
    pt.map_range(0x80_0000, 0x100_0000, 4 * M2)  # one 8M entry: 4 x 2M items at level 1
    w = walker(pt, frames)
    t = w.translate(0x1_F123)
    assert (t.phys, t.page_size, t.level) == (0x7_F123, K64, 0)
    t = w.translate(0xFF_FFFF)
    assert (t.phys, t.page_size, t.level) == (0x17F_FFFF, 4 * M2, 1)
    assert list(w.leaves()) == [Leaf(0x1_0000, 0x7_0000, K64, 0), Leaf(0x80_0000, 0x100_0000, 4 * M2, 1)]

    pt, frames = make("riscv", vasz=39, features=SE | {Feature.RISCV_SVNAPOT_64K})
    pt.map_range(0x4001_0000, 0x4001_0000, K64)
    pt.map_range(0xFFFF_FFC0_0000_0000, 0x8000_0000, G1)  # a leaf in the Sv39 top table itself
    w = walker(pt, frames)
    t = w.translate(0x4001_FFFF)
    assert (t.phys, t.page_size, t.level) == (0x4001_FFFF, K64, 0)
    t = w.translate(0xFFFF_FFC0_0000_1234)
    assert (t.phys, t.page_size, t.level) == (0x8000_1234, G1, 2)


# -- broken tables --------------------------------------------------------------------------------------------


def test_cycle_back_to_an_ancestor_is_a_walk_error() -> None:
    pt, frames = make("x86_64", top_level=3, vasz=48, features=SE)
    pt.map_range(0, 0x8000_0000, K4)
    l1 = table_at(pt, frames, 0, 1)
    # item 1 of the level-1 table (VA 2M) points back to the top: a cycle
    poke(frames, l1, 1, pt.fmt.encode_table(pt.top_phys, 1, pt.features))
    w = walker(pt, frames)
    with pytest.raises(WalkError):
        w.translate(M2)
    assert w.translate(0).phys == 0x8000_0000  # the intact part still translates
    with pytest.raises(WalkError):
        w.tables()
    with pytest.raises(WalkError):
        list(w.leaves())
    with pytest.raises(BadData):  # the engine's collect (free, preserve) refuses the cycle too
        pt.collect_tables()


def test_pointer_to_the_table_itself_is_a_walk_error() -> None:
    pt, frames = make("vtdss", top_level=2, vasz=39)
    pt.map_range(0, 0x8000_0000, K4)
    l1 = table_at(pt, frames, 0, 1)
    poke(frames, l1, 5, pt.fmt.encode_table(l1, 1, pt.features))
    w = walker(pt, frames)
    with pytest.raises(WalkError):
        w.translate(5 * M2)
    with pytest.raises(WalkError):
        w.tables()


def test_shared_table_is_a_walk_error_for_the_tree() -> None:
    pt, frames = make("x86_64", top_level=3, vasz=48, features=SE)
    pt.map_range(0, 0x8000_0000, K4)
    l0 = table_at(pt, frames, 0, 0)
    l1 = table_at(pt, frames, 0, 1)
    # two level-1 items point to the same level-0 table: hardware would translate both, but the
    # tree is no longer a tree (freeing it would free the table twice)
    poke(frames, l1, 7, pt.fmt.encode_table(l0, 1, pt.features))
    w = walker(pt, frames)
    assert w.translate(7 * M2).phys == 0x8000_0000
    with pytest.raises(WalkError, match="twice"):
        w.tables()
    with pytest.raises(WalkError, match="twice"):
        list(w.leaves())


@pytest.mark.parametrize("fmt", ["amdv1", "x86_64", "vtdss", "riscv"])
def test_pointer_to_a_foreign_page_is_a_walk_error(fmt: str) -> None:
    top_level = {"amdv1": 2, "x86_64": 3, "vtdss": 3, "riscv": None}[fmt]
    pt, frames = make(fmt, top_level=top_level, vasz={"amdv1": 64}.get(fmt, 48))
    pt.map_range(0, 0x8000_0000, K4)
    l1 = table_at(pt, frames, 0, 1)
    foreign = 0x7777_7000
    assert foreign not in frames.frames
    poke(frames, l1, 3, pt.fmt.encode_table(foreign, 1, pt.features))
    w = walker(pt, frames)
    with pytest.raises(WalkError, match="not a frame"):
        w.translate(3 * M2)
    with pytest.raises(WalkError, match="not a frame"):
        w.tables()
    with pytest.raises(WalkError, match="not a frame"):
        list(w.leaves())
    # a top that is not a frame either
    w = HardwareWalker(
        pt.fmt, {}, top_phys=pt.top_phys, top_level=pt.top_level, vasz=pt.range_vasz(), sign_extend=pt.sign_extend
    )
    with pytest.raises(WalkError):
        w.translate(0)


def test_truncated_frame_is_a_walk_error() -> None:
    pt, frames = make("x86_64", top_level=3, vasz=48, features=SE)
    pt.map_range(0, 0x8000_0000, K4)
    l0 = table_at(pt, frames, 0, 0)
    del frames.frames[l0][2048:]
    w = walker(pt, frames)
    with pytest.raises(WalkError, match="2048"):
        w.translate(0)


# -- tables() and leaves() ------------------------------------------------------------------------------------


def _flatten(t: TableInfo) -> list[TableInfo]:
    out = [t]
    for c in t.children:
        out.extend(_flatten(c))
    return out


def test_tables_counts_entries_and_leaves() -> None:
    pt, frames = make("x86_64", top_level=3, vasz=48, features=SE)
    pt.map_range(0, 0x1000_0000, 3 * K4)  # 3 x 4K in one level-0 table
    pt.map_range(M2, 0x20_0000, 2 * M2)  # 2 x 2M in the same level-1 table
    pt.map_range(G1, 0x4000_0000, G1)  # 1G in the level-2 table
    pt.map_range(UPPER48, 0x8000_0000, K4)  # upper half: a second chain of tables
    tree = walker(pt, frames).tables()
    assert (tree.phys, tree.level, tree.iova, tree.used) == (pt.top_phys, 3, 0, 2)
    assert tree.leaves == {}
    lower, upper = tree.children
    assert (lower.level, lower.iova, lower.used, lower.leaves) == (2, 0, 2, {G1: 1})
    assert upper.iova == UPPER48  # sign-extended
    (l1,) = lower.children
    assert (l1.level, l1.used, l1.leaves) == (1, 3, {M2: 2})
    (l0,) = l1.children
    assert (l0.level, l0.iova, l0.used, l0.leaves, l0.children) == (0, 0, 3, {K4: 3}, [])
    everything = _flatten(tree)
    assert len(everything) == len(frames.frames) == 7
    assert {t.phys: t.level for t in everything} == frames.levels
    assert [t.iova for t in _flatten(upper)] == [UPPER48] * 3


def test_tables_counts_contiguous_entries_by_items() -> None:
    pt, frames = make("amdv1", top_level=2, vasz=64)
    pt.map_range(0, 0x10_0000, K64 + K4)  # one 64K entry (16 items) and one 4K entry
    l0 = _flatten(walker(pt, frames).tables())[-1]
    assert (l0.level, l0.used, l0.leaves) == (0, 17, {K64: 1, K4: 1})


def test_leaves_in_both_halves() -> None:
    pt, frames = make("x86_64", top_level=3, vasz=48, features=SE)
    maps = [
        (0xFFFF_FFFF_FFFF_F000, 0x1000, K4),  # the very last page
        (UPPER48, 0x4000_0000, G1),
        (0x7FFF_FFE0_0000, 0x20_0000, M2),  # the last 2M of the lower half
        (0, 0x5000, K4),
    ]
    for iova, pa, size in maps:
        pt.map_range(iova, pa, size)
    leaves = list(walker(pt, frames).leaves())
    assert leaves == [
        Leaf(0, 0x5000, K4, 0),
        Leaf(0x7FFF_FFE0_0000, 0x20_0000, M2, 1),
        Leaf(UPPER48, 0x4000_0000, G1, 2),
        Leaf(0xFFFF_FFFF_FFFF_F000, 0x1000, K4, 0),
    ]
    w = walker(pt, frames)
    for leaf in leaves:
        assert w.translate(leaf.iova + leaf.size - 1).phys == leaf.phys + leaf.size - 1


def test_riscv_sv48_leaves_in_both_halves() -> None:
    pt, frames = make("riscv", vasz=48, features=SE)
    pt.map_range(0xFFFF_8000_0020_0000, 0x20_0000, M2)
    pt.map_range(0x1000, 0x3000, K4)
    assert list(walker(pt, frames).leaves()) == [
        Leaf(0x1000, 0x3000, K4, 0),
        Leaf(0xFFFF_8000_0020_0000, 0x20_0000, M2, 1),
    ]


def test_walker_ignores_engine_state() -> None:
    """The walker reads bytes only: a snapshot taken before a change does not see it, one
    taken after does, whatever the engine caches."""
    pt, frames = make("vtdss", top_level=3, vasz=48)
    pt.map_range(0, 0x8000_0000, M2)
    before = walker(pt, frames)
    assert pt.unmap_range(0, M2) == M2
    assert before.translate(0).phys == 0x8000_0000
    assert walker(pt, frames).translate(0).phys is None
