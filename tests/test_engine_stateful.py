"""Stateful property tests of the engine against a plain reference model.

For each format a hypothesis state machine maps, unmaps and looks up ranges on
a ``PageTable`` over ``DictFrames``. After every step three views must agree:

* the engine (``iova_to_phys``),
* the ``HardwareWalker`` built only from the frames' raw bytes,
* a dict reference ``{iova: (paddr, size)}`` whose leaves are predicted from
  the kernel's rules (greedy page-size choice; unmap removes whole entries,
  even past the end of the range, and stops at the first hole).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from iommupt_store.errors import AddressInUse, OutOfRange, Overflow
from iommupt_store.formats import get_format
from iommupt_store.formats.base import Feature, Prot
from iommupt_store.pagetable.engine import PageTable
from iommupt_store.pagetable.frames import DictFrames
from iommupt_store.pagetable.walker import HardwareWalker

U64 = (1 << 64) - 1
K4, K64, M1, M2, G1 = 1 << 12, 1 << 16, 1 << 20, 1 << 21, 1 << 30


def _item_lg2(level: int) -> int:
    return 12 + 9 * level


@dataclass(frozen=True)
class Config:
    name: str
    format: str
    top_level: int | None
    vasz: int
    features: frozenset[Feature]
    #: the domain pgsize_bitmap the kernel reports for this configuration
    bitmap: int
    #: page sizes (lg2) the map rule draws from
    sizes: tuple[int, ...]
    #: window bases the map/lookup rules draw iovas from
    windows: tuple[int, ...]
    sign_extend: bool = False
    dynamic_top: bool = False
    max_top_level: int = 4


def _amdv1_bitmap() -> int:
    bits = 0
    for lg2 in range(12, 52):
        if lg2 != 39:  # 512 GiB pages are unusable (erratum)
            bits |= 1 << lg2
    return bits


CONFIGS = {
    "amdv1": Config(
        "amdv1",
        "amdv1",
        top_level=1,
        vasz=64,
        features=frozenset(),
        bitmap=_amdv1_bitmap(),
        # 4K, 8K, 16K, 64K, 1M (contiguous level 0), 2M, 4M (contiguous level 1), 1G, 2G, 1T (2 x 512G items)
        sizes=(12, 13, 14, 16, 20, 21, 22, 30, 31, 40),
        windows=(0, 1 << 32, 1 << 45, 1 << 60),
        dynamic_top=True,
        max_top_level=5,
    ),
    "x86_64": Config(
        "x86_64",
        "x86_64",
        top_level=3,
        vasz=48,
        features=frozenset({Feature.SIGN_EXTEND}),
        bitmap=K4 | M2 | G1,
        sizes=(12, 21, 30),
        windows=(0, (1 << 47) - (1 << 32), 0xFFFF_8000_0000_0000, 0xFFFF_FFFF_0000_0000),
        sign_extend=True,
    ),
    "vtdss": Config(
        "vtdss",
        "vtdss",
        top_level=2,
        vasz=39,
        features=frozenset(),
        bitmap=K4 | M2 | G1,
        sizes=(12, 21, 30),
        windows=(0, 1 << 37, (1 << 39) - (1 << 32)),
    ),
    "riscv": Config(
        "riscv",
        "riscv",
        top_level=None,
        vasz=39,
        features=frozenset({Feature.SIGN_EXTEND, Feature.RISCV_SVNAPOT_64K}),
        bitmap=K4 | K64 | M2 | G1,
        sizes=(12, 16, 21, 30),
        windows=(0, (1 << 38) - (1 << 32), (1 << 64) - (1 << 38), (1 << 64) - (1 << 32)),
        sign_extend=True,
    ),
}

#: when a map or unmap leaves more leaves than this, the invariant checks a sample of them
CHECK_ALL_LEAVES = 48


@dataclass
class Reference:
    """What the domain maps, as the kernel's rules predict it."""

    cfg: Config
    top_level: int
    leaves: dict[int, tuple[int, int]] = field(default_factory=dict)  # iova -> (paddr, size)
    starts: list[int] = field(default_factory=list)

    # -- geometry, written from the spec (not from the engine) --------------------------------------
    def range_vasz(self, level: int | None = None) -> int:
        lvl = self.top_level if level is None else level
        if self.cfg.dynamic_top and lvl != self.cfg.max_top_level:
            return min(self.cfg.vasz, 9 + _item_lg2(lvl))
        return self.cfg.vasz

    def in_range(self, va: int, last: int, vasz: int | None = None) -> bool:
        """``pt_check_range``: the bits at and above the VA width of both ends equal the prefix,
        which with sign extension is chosen by the sign bit of ``va`` alone."""
        v = self.range_vasz() if vasz is None else vasz
        if not 0 <= va <= last <= U64:
            return False
        if v >= 64:
            return True
        prefix = U64 if self.cfg.sign_extend and va >> (v - 1) & 1 else 0
        return va >> v == prefix >> v and last >> v == prefix >> v

    def canonical(self, va: int) -> int:
        """The VA the tables decode ``va`` as: the top index takes the low bits only, so with sign
        extension a lower-half range that runs past the sign bit continues in the upper half."""
        v = self.range_vasz()
        if not self.cfg.sign_extend or v >= 64:
            return va
        low = va & ((1 << v) - 1)
        return low | (U64 ^ ((1 << v) - 1)) if low >> (v - 1) & 1 else low

    def plan(self, va: int, pa: int, length: int) -> list[tuple[int, int, int]]:
        """The leaves a map installs: at each step the largest page size of the bitmap that
        both addresses are aligned to and that fits in what is left."""
        out = []
        end = va + length
        while va < end:
            size = max(
                lg2
                for lg2 in range(64)
                if self.cfg.bitmap >> lg2 & 1 and not (va | pa) % (1 << lg2) and (1 << lg2) <= end - va
            )
            out.append((va, pa, 1 << size))
            va, pa = va + (1 << size), pa + (1 << size)
        return out

    def grow_for(self, va: int, last: int, first_size: int) -> bool:
        """``increase_top``: raise the top until it decodes the range and can hold the first leaf;
        False (and no change) when that needs a level above the format's or one decoding the full VA."""
        leaf_level = _level_of(first_size)
        level = self.top_level
        while not (self.in_range(va, last, self.range_vasz(level)) and leaf_level <= level):
            level += 1
            if level > self.cfg.max_top_level or _item_lg2(level) >= self.cfg.vasz:
                return False
        self.top_level = level
        return True

    # -- contents --------------------------------------------------------------------------------------
    def find(self, iova: int) -> tuple[int, int, int] | None:
        i = bisect.bisect_right(self.starts, iova) - 1
        if i < 0:
            return None
        start = self.starts[i]
        pa, size = self.leaves[start]
        return (start, pa, size) if iova < start + size else None

    def overlaps_any(self, plan: list[tuple[int, int, int]]) -> bool:
        return any(self.overlaps(self.canonical(va), self.canonical(va) + size) for va, _, size in plan)

    def overlaps(self, va: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, va) - 1
        if i >= 0 and self.starts[i] + self.leaves[self.starts[i]][1] > va:
            return True
        j = bisect.bisect_left(self.starts, va)
        return j < len(self.starts) and self.starts[j] < end

    def add(self, va: int, pa: int, size: int) -> None:
        self.leaves[va] = (pa, size)
        bisect.insort(self.starts, va)

    def remove(self, va: int) -> None:
        del self.leaves[va]
        self.starts.remove(va)

    def translate(self, iova: int) -> int | None:
        hit = self.find(iova)
        return None if hit is None else hit[1] + (iova - hit[0])


def expected_unmap(ref: Reference, leaves: dict[int, tuple[int, int]], va: int, length: int) -> list[int]:
    """The leaf starts ``unmap_range(va, length)`` removes, from the leaves present before it.

    Nothing when the range fails ``pt_check_range`` or starts inside a page; otherwise
    whole entries from ``va`` on while each starts where the previous ended and at or before
    the last byte of the range; the first hole stops the walk.
    """
    last = va + length - 1
    if length <= 0 or last > U64 or not ref.in_range(va, last):
        return []
    removed, cur = [], va
    while cur <= last and ref.canonical(cur) in leaves:
        removed.append(ref.canonical(cur))
        cur += leaves[removed[-1]][1]
    return removed


def _level_of(size: int) -> int:
    return (size.bit_length() - 1 - 12) // 9


def lower_tables(walker: HardwareWalker) -> dict[int, tuple[int, int]]:
    """Every table but the top: ``{phys: (first iova, span)}``."""
    out: dict[int, tuple[int, int]] = {}
    todo = list(walker.tables().children)
    while todo:
        t = todo.pop()
        out[t.phys] = (t.iova, 1 << (_item_lg2(t.level) + 9))
        todo.extend(t.children)
    return out


def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def walker_for(pt: PageTable, frames: DictFrames) -> HardwareWalker:
    """A hardware walker that sees only the frames' bytes."""
    return HardwareWalker(
        pt.fmt,
        {phys: bytes(buf) for phys, buf in frames.frames.items()},
        top_phys=pt.top_phys,
        top_level=pt.top_level,
        vasz=pt.range_vasz(),
        sign_extend=pt.sign_extend,
    )


class PageTableMachine(RuleBasedStateMachine):
    cfg: Config

    @initialize()
    def setup(self) -> None:
        cfg = self.cfg
        self.frames = DictFrames()
        self.pt = PageTable.create(
            get_format(cfg.format),
            self.frames,
            top_level=cfg.top_level,
            hw_max_vasz_lg2=cfg.vasz,
            features=cfg.features,
        )
        assert self.pt.pgsize_bitmap == cfg.bitmap
        assert self.pt.sign_extend == cfg.sign_extend
        self.ref = Reference(cfg, self.pt.top_level)

    # -- rules -------------------------------------------------------------------------------------------
    @rule(data=st.data())
    def map(self, data: st.DataObject) -> None:
        cfg, ref = self.cfg, self.ref
        lg2 = data.draw(st.sampled_from(cfg.sizes), label="size_lg2")
        size = 1 << lg2
        base = data.draw(st.sampled_from(cfg.windows), label="window")
        slot = data.draw(st.integers(0, 5), label="slot")
        count = data.draw(st.integers(1, 3), label="count")
        tail = data.draw(st.sampled_from((0, 0, K4, 3 * K4, K64 + K4)), label="tail") if lg2 > 12 else 0
        pa_max_lg2 = 46
        pa = data.draw(st.integers(0, (1 << (pa_max_lg2 - lg2)) - 1), label="pa_units") << lg2
        if lg2 <= 21 and count == 1:
            # a paddr only 4K (or 64K) aligned: the range is split into smaller pages
            pa += data.draw(st.sampled_from((0, 0, K4, K64)), label="skew")
        iova = base + slot * size
        length = count * size + tail
        last = iova + length - 1

        if last > U64:
            event("map: EOVERFLOW")
            with pytest.raises(Overflow):
                self.pt.map_range(iova, pa, length)
            return
        if not cfg.dynamic_top and not ref.in_range(iova, last):
            event("map: ERANGE")
            with pytest.raises(OutOfRange):
                self.pt.map_range(iova, pa, length)
            return
        plan = ref.plan(iova, pa, length)
        if cfg.dynamic_top and not ref.grow_for(iova, last, plan[0][2]):
            event("map: ERANGE (top cannot grow)")
            with pytest.raises(OutOfRange):
                self.pt.map_range(iova, pa, length)
            return
        if ref.overlaps_any(plan):
            event("map: EADDRINUSE")
            with pytest.raises(AddressInUse):
                self.pt.map_range(iova, pa, length, Prot.READ | Prot.WRITE)
            return
        tables_before = set(self.frames.frames)
        self.pt.map_range(iova, pa, length, Prot.READ | Prot.WRITE)
        if tables_before - set(self.frames.frames):
            event("map: replaced an empty table by a leaf")
        for va, p, sz in plan:
            ref.add(ref.canonical(va), p, sz)
        event("map: ok")
        for sz in sorted({sz for _, _, sz in plan}):
            event(f"leaf size 2^{sz.bit_length() - 1}")
        if cfg.dynamic_top and ref.top_level != cfg.top_level:
            event(f"top grown to level {ref.top_level}")

    @rule(data=st.data())
    def unmap(self, data: st.DataObject) -> None:
        ref = self.ref
        if not ref.leaves:
            base = data.draw(st.sampled_from(self.cfg.windows), label="window")
            assert self.pt.unmap_range(base, M2) == 0
            return
        i = data.draw(st.integers(0, len(ref.starts) - 1), label="leaf")
        va = ref.starts[i]
        size = ref.leaves[va][1]
        kind = data.draw(st.sampled_from(["whole", "first4k", "span", "bytes", "inside", "table"]), label="kind")
        if kind == "table":
            # the whole span of the table holding the leaf, or all of it but the last byte
            span = 1 << (_item_lg2(_level_of(size)) + 9)
            va &= ~(span - 1)
            length = span - data.draw(st.sampled_from((0, 1)), label="short")
        elif kind == "whole":
            length = size
        elif kind == "first4k":
            length = K4  # on a large page: the whole page goes
        elif kind == "span":
            j = data.draw(st.integers(i, min(i + 6, len(ref.starts) - 1)), label="to")
            end_va = ref.starts[j]
            length = end_va + ref.leaves[end_va][1] - va - data.draw(st.sampled_from((0, 1, K4)), label="short")
        elif kind == "bytes":
            length = data.draw(st.integers(1, 1 << 32), label="length")
        else:
            # starting inside a page never splits it: nothing is unmapped
            if size == K4:
                return
            va += data.draw(st.integers(1, size // K4 - 1), label="offset") * K4
            length = data.draw(st.sampled_from((K4, size)), label="length")
        self.unmap_and_check(va, length, kind)

    def unmap_and_check(self, va: int, length: int, kind: str) -> None:
        ref = self.ref
        walker = walker_for(self.pt, self.frames)
        before = {lf.iova: (lf.phys, lf.size) for lf in walker.leaves()}
        tables_before = lower_tables(walker)
        removed = expected_unmap(ref, before, va, length)
        assert self.pt.unmap_range(va, length) == sum(before[v][1] for v in removed)
        # a table is freed only when the range covers its whole span and the walk got through it
        covered = merge_intervals([(v, v + before[v][1]) for v in removed])
        raw = self.raw_in_range_of(va)
        freed = {
            phys
            for phys, (start, span) in tables_before.items()
            if any(lo <= start and start + span <= hi for lo, hi in covered)
            and va <= raw(start)
            and raw(start + span - 1) <= va + length - 1
        }
        assert set(tables_before) - set(self.frames.frames) == freed
        if freed:
            event("unmap: freed tables")
        elif removed and any(start == va for start, _ in tables_before.values()):
            event("unmap: table at the start kept")
        event(f"unmap {kind}: {'nothing' if not removed else 'one' if len(removed) == 1 else 'several'}")
        if removed and sum(before[v][1] for v in removed) > length:
            event("unmap: more than asked")
        for v in removed:
            ref.remove(v)

    @rule(data=st.data())
    def fill_and_drop_table(self, data: st.DataObject) -> None:
        """Fill a whole level-0 (or level-1) table with 4K (2M) pages, then unmap its span, or all
        of it but the last byte: every page goes either way, the table only in the first case."""
        span = data.draw(st.sampled_from((M2, G1)), label="span")
        va = data.draw(st.sampled_from(self.cfg.windows), label="window") + data.draw(st.integers(0, 3)) * span
        if va + span - 1 > U64 or not self.ref.in_range(va, va + span - 1) or self.ref.overlaps(va, va + span):
            return
        small = K4 if span == M2 else M2
        pa = data.draw(st.integers(1, 1 << 20), label="pa_units") * span + small  # never aligned to anything larger
        plan = self.ref.plan(va, pa, span)
        assert {sz for _, _, sz in plan} == {small}
        if self.cfg.dynamic_top and not self.ref.grow_for(va, va + span - 1, small):
            return
        self.pt.map_range(va, pa, span)
        for v, p, sz in plan:
            self.ref.add(self.ref.canonical(v), p, sz)
        self.unmap_and_check(va, span - data.draw(st.sampled_from((0, 1)), label="short"), "fill")

    def raw_in_range_of(self, va: int) -> Callable[[int], int]:
        """Canonical VA -> the VA as a range starting at ``va`` spells it (a lower-half range that runs
        past the sign bit continues in the upper half without the sign-extension bits)."""
        v = self.ref.range_vasz()
        if self.cfg.sign_extend and v < 64 and not va >> (v - 1) & 1:
            return lambda x: x & ((1 << v) - 1)
        return lambda x: x

    @rule(data=st.data())
    def collapse(self, data: st.DataObject) -> None:
        """Unmap every leaf in an aligned block one by one (their now empty tables stay, since no
        unmap covered their whole span), then map one page of a higher level over the block: the
        map must free the empty tables and install the leaf."""
        ref = self.ref
        if not ref.leaves:
            return
        start = data.draw(st.sampled_from(ref.starts), label="leaf")
        level = (ref.leaves[start][1].bit_length() - 1 - 12) // 9
        bigger = [lg2 for lg2 in self.cfg.sizes if (lg2 - 12) // 9 > level]
        if not bigger:
            return
        size = 1 << data.draw(st.sampled_from(bigger), label="size_lg2")
        base = start & ~(size - 1)
        inside = [va for va in ref.starts if base <= va < base + size]
        covering = ref.find(base)
        if (covering is not None and covering[0] < base) or any(va + ref.leaves[va][1] > base + size for va in inside):
            return  # a page larger than the block covers part of it
        for va in inside:
            assert self.pt.unmap_range(va, ref.leaves[va][1]) == ref.leaves[va][1]
            ref.remove(va)
        tables_before = set(self.frames.frames)
        pa = data.draw(st.integers(0, (1 << (46 - size.bit_length())) - 1), label="pa_units") * size
        if self.cfg.dynamic_top:
            assert ref.grow_for(base, base + size - 1, size)
        self.pt.map_range(base, pa, size)
        ref.add(base, pa, size)
        event("collapse: replaced empty tables" if len(self.frames.frames) < len(tables_before) else "collapse")

    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        if self.ref.leaves and data.draw(st.booleans(), label="near_leaf"):
            start = data.draw(st.sampled_from(self.ref.starts), label="leaf")
            iova = start + data.draw(st.integers(-K4, self.ref.leaves[start][1] + K4), label="offset")
        else:
            iova = data.draw(st.sampled_from(self.cfg.windows), label="window")
            iova += data.draw(st.integers(0, 1 << 34), label="offset")
        self.check_address(walker_for(self.pt, self.frames), iova & U64)

    # -- invariants ------------------------------------------------------------------------------------
    def check_address(self, walker: HardwareWalker, iova: int) -> None:
        expect = self.ref.translate(iova)
        t = walker.translate(iova)
        assert t.phys == expect, f"walker {iova:#x}: {t}, reference {expect}"
        if self.ref.in_range(iova, iova):
            assert self.pt.iova_to_phys(iova) == (expect or 0), f"engine at {iova:#x}"
        else:
            assert expect is None
            with pytest.raises(OutOfRange):
                self.pt.iova_to_phys(iova)

    @invariant()
    def views_agree(self) -> None:
        if not hasattr(self, "ref"):
            return
        ref, pt = self.ref, self.pt
        assert pt.top_level == ref.top_level
        walker = walker_for(pt, self.frames)
        leaves = {(lf.iova, lf.phys, lf.size) for lf in walker.leaves()}
        assert leaves == {(va, pa, sz) for va, (pa, sz) in ref.leaves.items()}
        starts = ref.starts
        if len(starts) > CHECK_ALL_LEAVES:
            step = len(starts) // CHECK_ALL_LEAVES + 1
            starts = starts[::step] + starts[-2:]
        for va in starts:
            pa, size = ref.leaves[va]
            t = walker.translate(va)
            assert (t.phys, t.page_size) == (pa, size)
            assert pt.iova_to_phys(va) == pa
            for off in (size - 1, (size >> 1) + 0x123, 0xFFF):
                if off < size:
                    assert walker.translate(va + off).phys == pa + off
                    assert pt.iova_to_phys(va + off) == pa + off
            self.check_address(walker, (va + size) & U64)  # the next page: mapped or a hole
        # every allocated frame is a table of the tree, at the level it was allocated for
        tree = walker.tables()
        levels: dict[int, int] = {}
        todo = [tree]
        while todo:
            t = todo.pop()
            levels[t.phys] = t.level
            todo.extend(t.children)
        assert levels == self.frames.levels
        assert set(pt.collect_tables()) == set(self.frames.frames)


def _machine_for(cfg: Config) -> type[PageTableMachine]:
    return type(f"PageTableMachine_{cfg.name}", (PageTableMachine,), {"cfg": cfg})


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestAmdv1 = _machine_for(CONFIGS["amdv1"]).TestCase
TestAmdv1.settings = SETTINGS
TestX86_64 = _machine_for(CONFIGS["x86_64"]).TestCase
TestX86_64.settings = SETTINGS
TestVtdss = _machine_for(CONFIGS["vtdss"]).TestCase
TestVtdss.settings = SETTINGS
TestRiscv = _machine_for(CONFIGS["riscv"]).TestCase
TestRiscv.settings = SETTINGS


# -- the reference model's own rules, pinned on the KUnit-visible cases -----------------------------------------


def test_reference_unmap_rules() -> None:
    ref = Reference(CONFIGS["x86_64"], 3)
    leaves = {0: (0, M2), M2: (M2, M2), 3 * M2: (0, K4)}
    assert expected_unmap(ref, leaves, 0, K4) == [0]  # 4K at the start of a 2M page removes 2M, not the next
    assert expected_unmap(ref, leaves, 0, M2 + 1) == [0, M2]  # whole entries past the end
    assert expected_unmap(ref, leaves, 0, 4 * M2) == [0, M2]  # stops at the hole at 4M
    assert expected_unmap(ref, leaves, K4, M2) == []  # inside a page
    assert expected_unmap(ref, leaves, 1 << 47, K4) == []  # non-canonical start
    # pt_check_range compares only the bits at and above bit 48: a lower-half range may run on
    # into the upper half, whose first top item follows the last lower-half one
    upper = 0xFFFF_8000_0000_0000
    leaves = {(1 << 47) - K4: (0, K4), upper: (K4, K4)}
    assert expected_unmap(ref, leaves, (1 << 47) - K4, 2 * K4) == [(1 << 47) - K4, upper]


def test_reference_plan_is_greedy() -> None:
    ref = Reference(CONFIGS["riscv"], 2)
    plan = ref.plan(M2 - K64 - K4, 0x1000_0000 - K64 - K4, K4 + K64 + M2 + K4)
    assert [s for _, _, s in plan] == [K4, K64, M2, K4]
    amd = Reference(CONFIGS["amdv1"], 1)
    assert [s for _, _, s in amd.plan(0, 0, 3 * K4 + K64)] == [K64, 2 * K4, K4]


def test_sign_extended_lower_range_runs_into_upper_half() -> None:
    """The kernel's ``pt_check_range`` takes the half from the sign bit of ``va`` and then compares
    only the bits above the VA width, so ``[2^47 - 4K, 2^47 + 4K)`` passes on x86_64 48-bit and its
    second page lands at top index 256: the first page of the upper half."""
    frames = DictFrames()
    pt = PageTable.create(
        get_format("x86_64"), frames, top_level=3, hw_max_vasz_lg2=48, features=frozenset({Feature.SIGN_EXTEND})
    )
    upper = 0xFFFF_8000_0000_0000
    pt.map_range((1 << 47) - K4, 0x5000_0000, 2 * K4)
    assert pt.iova_to_phys((1 << 47) - K4) == 0x5000_0000
    assert pt.iova_to_phys(upper) == 0x5000_1000
    with pytest.raises(OutOfRange):
        pt.iova_to_phys(1 << 47)
    leaves = {(lf.iova, lf.phys, lf.size) for lf in walker_for(pt, frames).leaves()}
    assert leaves == {((1 << 47) - K4, 0x5000_0000, K4), (upper, 0x5000_1000, K4)}
    with pytest.raises(OutOfRange):  # starting in the non-canonical hole is refused
        pt.map_range(1 << 47, 0, K4)
    assert pt.unmap_range((1 << 47) - K4, 2 * K4) == 2 * K4
    assert list(walker_for(pt, frames).leaves()) == []
