"""Port of the kernel's generic KUnit suite (``kunit_generic_pt.h``, spec §5.4).

``check_all_levels`` walks a live domain down to the highest VA; here the
same levels are visited with pure format calls: 0..top_level from
``geometry()``, or for DYNAMIC_TOP every level the top can grow to (item size
below max VA), the top then decoding the whole ``max_vasz``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from iommupt_store.errors import IommuptError
from iommupt_store.formats import (
    EntryType,
    Feature,
    Geometry,
    PageTableFormat,
    Prot,
    get_format,
    item_lg2sz,
    pgsize_bitmap,
    possible_sizes,
)
from iommupt_store.formats.amdv1 import AmdV1Format
from iommupt_store.formats.base import TABLE_ITEMS_LG2
from iommupt_store.formats.vtdss import VtdssFormat
from iommupt_store.formats.x86_64 import X86_64Format
from tests.kunit_configs import KUNIT_CONFIGS, KUNIT_IDS, KUNIT_TEST_OA, KunitConfig

U64 = (1 << 64) - 1

#: spec §5.2 "pgsize / smallest" column
EXPECTED_PGSIZE = {
    "amdv1_cfg_0": 0xFFF7FFFFFF000,
    "x86_64_cfg_0": 0x40201000,
    "x86_64_cfg_1": 0x40201000,
    "x86_64_cfg_2": 0x40201000,
    "x86_64_cfg_3": 0x40201000,
    "vtdss_cfg_0": 0x40201000,
    "vtdss_cfg_1": 0x40201000,
    "vtdss_cfg_2": 0x40201000,
    "riscv_cfg_0": 0x40211000,
    "riscv_cfg_1": 0x8040201000,
    "riscv_cfg_2": 0x1008040211000,
}

#: spec §3.5 "leaf levels" row
LEAF_LEVELS = {"amdv1": range(5), "x86_64": range(3), "vtdss": range(3), "riscv": range(5)}

#: spec §5.2 top level and geometry per configuration
EXPECTED_GEOMETRY = {
    "amdv1_cfg_0": Geometry(2, 64, 52),
    "x86_64_cfg_0": Geometry(3, 48, 52),
    "x86_64_cfg_1": Geometry(4, 57, 52),
    "x86_64_cfg_2": Geometry(3, 47, 52),
    "x86_64_cfg_3": Geometry(4, 56, 52),
    "vtdss_cfg_0": Geometry(2, 39, 52),
    "vtdss_cfg_1": Geometry(3, 48, 52),
    "vtdss_cfg_2": Geometry(4, 57, 52),
    "riscv_cfg_0": Geometry(2, 39, 56),
    "riscv_cfg_1": Geometry(3, 48, 56),
    "riscv_cfg_2": Geometry(4, 57, 56),
}


@dataclass(frozen=True)
class Fixture:
    """What ``pt_kunit_priv_init`` derives for one configuration."""

    cfg: KunitConfig
    fmt: PageTableFormat
    geo: Geometry
    pgsize_bitmap: int
    test_oa: int

    @property
    def features(self) -> frozenset[Feature]:
        return self.cfg.features

    @property
    def smallest_lg2(self) -> int:
        return (self.pgsize_bitmap & -self.pgsize_bitmap).bit_length() - 1

    @property
    def dynamic(self) -> bool:
        return self.fmt.effective(Feature.DYNAMIC_TOP, self.features)

    def walk_top(self) -> int:
        """The top level after check_all_levels mapped the highest VA."""
        if not self.dynamic:
            return self.geo.top_level
        return max(
            lvl for lvl in range(self.fmt.max_top_level + 1) if item_lg2sz(lvl) < self.geo.max_vasz_lg2
        )

    def top_range_vasz(self, top: int) -> int:
        """``_pt_top_range``: DYNAMIC_TOP caps the width to what ``top`` decodes."""
        if self.dynamic and top != self.fmt.max_top_level:
            return min(self.geo.max_vasz_lg2, TABLE_ITEMS_LG2 + item_lg2sz(top))
        return self.geo.max_vasz_lg2

    def table_span_lg2(self, level: int) -> int:
        """``pt_table_oa_lg2sz`` for the table at ``level`` during the walk."""
        top = self.walk_top()
        if level == top:
            return self.top_range_vasz(top)
        return min(self.geo.max_vasz_lg2, TABLE_ITEMS_LG2 + item_lg2sz(level))

    def levels(self) -> range:
        """Bottom-up, like ``check_all_levels`` calls its function."""
        return range(self.walk_top() + 1)

    def sizes(self, level: int) -> list[int]:
        bitmap = possible_sizes(self.fmt, level, self.features)
        return [p for p in range(64) if bitmap >> p & 1]


def make_fixture(cfg: KunitConfig) -> Fixture:
    fmt = get_format(cfg.format)
    geo = fmt.geometry(
        top_level=cfg.top_level,
        hw_max_vasz_lg2=cfg.hw_max_vasz_lg2,
        hw_max_oasz_lg2=cfg.hw_max_oasz_lg2,
        features=cfg.features,
    )
    return Fixture(
        cfg=cfg,
        fmt=fmt,
        geo=geo,
        pgsize_bitmap=pgsize_bitmap(fmt, geo, cfg.features),
        test_oa=KUNIT_TEST_OA % (1 << geo.max_oasz_lg2),
    )


@pytest.fixture(params=KUNIT_CONFIGS, ids=KUNIT_IDS)
def fx(request: pytest.FixtureRequest) -> Fixture:
    cfg: KunitConfig = request.param
    return make_fixture(cfg)


def install(fx: Fixture, oa: int, level: int, size_lg2: int, attrs: int) -> list[int]:
    """The items a leaf occupies at index 0 of a ``level`` table."""
    raw = fx.fmt.encode_leaf(oa, level, size_lg2, attrs)
    return [raw] * (1 << (size_lg2 - item_lg2sz(level)))


# --------------------------------------------------------------------------- test_init


def test_init(fx: Fixture) -> None:
    assert fx.pgsize_bitmap != 0
    assert fx.pgsize_bitmap == EXPECTED_PGSIZE[fx.cfg.id]
    assert fx.geo == EXPECTED_GEOMETRY[fx.cfg.id]
    assert fx.smallest_lg2 == 12


def test_test_oa(fx: Fixture) -> None:
    expected = 0xA71445DEADBEEF if fx.geo.max_oasz_lg2 == 56 else 0x71445DEADBEEF
    assert fx.test_oa == expected


# --------------------------------------------------------------------------- test_max_va


def test_max_va(fx: Fixture) -> None:
    assert fx.geo.max_vasz_lg2 >= fx.top_range_vasz(fx.geo.top_level)
    assert fx.geo.max_vasz_lg2 >= fx.top_range_vasz(fx.walk_top())


# --------------------------------------------------------------------------- walk shape


def test_check_all_levels_shape(fx: Fixture) -> None:
    # Every table on the path has more than one item and every level above 0
    # can point to a table.
    for level in fx.levels():
        assert fx.table_span_lg2(level) - item_lg2sz(level) >= 1
        assert fx.fmt.can_hold_table(level) == (level > 0)


# --------------------------------------------------------------------------- test_table_ptr


def test_table_ptr(fx: Fixture) -> None:
    paddr = fx.test_oa & ~((1 << fx.smallest_lg2) - 1)
    for level in fx.levels():
        if not fx.fmt.can_hold_table(level):
            continue
        assert fx.fmt.decode(0, level, fx.features).type is EntryType.EMPTY
        raw = fx.fmt.encode_table(paddr, level, fx.features)
        # Installing twice (cmpxchg sees the new value) gives the same item.
        assert fx.fmt.encode_table(paddr, level, fx.features) == raw
        dec = fx.fmt.decode(raw, level, fx.features)
        assert dec.type is EntryType.TABLE
        assert dec.addr == paddr
        assert fx.fmt.decode(0, level, fx.features).type is EntryType.EMPTY


# --------------------------------------------------------------------------- test_table_radix


def test_table_radix(fx: Fixture) -> None:
    vbits = (1 << fx.smallest_lg2) - 1
    for level in fx.levels():
        # All lower VA bits are decoded by the levels below, none skipped.
        assert vbits == (1 << item_lg2sz(level)) - 1
        span = fx.table_span_lg2(level)
        assert span <= 64
        vbits = (1 << span) - 1
    top_vasz = fx.top_range_vasz(fx.walk_top())
    assert vbits == (U64 if top_vasz == 64 else (1 << fx.geo.max_vasz_lg2) - 1)


# --------------------------------------------------------------------------- test_entry_possible_sizes


def test_entry_possible_sizes(fx: Fixture) -> None:
    for level in fx.levels():
        bitmap = possible_sizes(fx.fmt, level, fx.features)
        isz = item_lg2sz(level)
        span = fx.table_span_lg2(level)
        if level not in LEAF_LEVELS[fx.fmt.name]:
            assert bitmap == 0
            continue
        assert bitmap & ((1 << isz) - 1) == 0
        assert bitmap >> span == 0
        if fx.fmt.name == "amdv1" and level == 3:
            assert bitmap == 0xFF0000000000
        else:
            assert bitmap >> isz & 1
        if span < 64:
            assert not bitmap >> span & 1


# --------------------------------------------------------------------------- test_entry_oa


def test_entry_oa(fx: Fixture) -> None:
    attrs = fx.fmt.leaf_attrs(Prot.READ, fx.features)
    max_oa = (1 << fx.geo.max_oasz_lg2) - 1
    checked = 0
    for level in fx.levels():
        isz = item_lg2sz(level)
        for size_lg2 in fx.sizes(level):
            for oa in (fx.test_oa, 0, max_oa):
                base = oa & ~((1 << size_lg2) - 1)
                items = install(fx, base, level, size_lg2, attrs)
                for i, raw in enumerate(items):
                    dec = fx.fmt.decode(raw, level, fx.features)
                    assert dec.type is EntryType.OA
                    assert dec.addr == base
                    assert dec.addr + i * (1 << isz) == base + (i << isz)
                    assert dec.contig_lg2 == size_lg2 - isz
                checked += 1
    assert checked == 3 * sum(len(fx.sizes(lvl)) for lvl in fx.levels())
    assert checked > 0


# --------------------------------------------------------------------------- test_attr_from_entry


def test_attr_from_entry(fx: Fixture) -> None:
    for level in fx.levels():
        for size_lg2 in fx.sizes(level):
            base = fx.test_oa & ~((1 << size_lg2) - 1)
            for prot in range(32):
                try:
                    attrs = fx.fmt.leaf_attrs(prot, fx.features)
                except IommuptError:
                    assert prot != Prot.READ | Prot.WRITE
                    continue
                raw = fx.fmt.encode_leaf(base, level, size_lg2, attrs)
                recovered = fx.fmt.attrs_from_entry(raw, level)
                assert fx.fmt.encode_leaf(base, level, size_lg2, recovered) == raw


# --------------------------------------------------------------------------- test_dirty


@pytest.mark.parametrize("cfg", KUNIT_CONFIGS, ids=KUNIT_IDS)
def test_dirty(cfg: KunitConfig) -> None:
    fx = make_fixture(cfg)
    if not fx.fmt.has_dirty:
        pytest.skip("format has no dirty bits")
    fmt = fx.fmt
    assert isinstance(fmt, AmdV1Format | VtdssFormat)
    attrs = fmt.leaf_attrs(Prot.READ | Prot.WRITE, fx.features)
    for level in fx.levels():
        for size_lg2 in fx.sizes(level):
            base = fx.test_oa & ~((1 << size_lg2) - 1)
            items = install(fx, base, level, size_lg2, attrs)
            items = [fmt.make_clean(raw) for raw in items]
            assert not any(fmt.is_dirty(raw) for raw in items)
            for i in range(len(items)):
                items[i] = fmt.make_dirty(items[i])
                assert any(fmt.is_dirty(raw) for raw in items)
                # Dirty bits never change what the entry translates to.
                assert fmt.decode(items[i], level, fx.features).addr == base
                items = [fmt.make_clean(raw) for raw in items]
                assert not any(fmt.is_dirty(raw) for raw in items)


# --------------------------------------------------------------------------- test_sw_bit_*


def _sw_bits(fx: Fixture) -> list[int]:
    fmt = fx.fmt
    assert isinstance(fmt, X86_64Format | VtdssFormat)
    assert fmt.max_sw_bit is not None
    bits = [fmt.sw_bit(n) for n in range(fmt.max_sw_bit + 1)]
    # Distinct single bits.
    assert all(b and b & (b - 1) == 0 for b in bits)
    assert len(set(bits)) == len(bits)
    return bits


@pytest.mark.parametrize("cfg", KUNIT_CONFIGS, ids=KUNIT_IDS)
def test_sw_bit_leaf(cfg: KunitConfig) -> None:
    fx = make_fixture(cfg)
    if fx.fmt.max_sw_bit is None:
        pytest.skip("format has no software bits")
    bits = _sw_bits(fx)
    attrs = fx.fmt.leaf_attrs(Prot.READ | Prot.WRITE, fx.features)
    for level in fx.levels():
        for size_lg2 in fx.sizes(level):
            base = fx.test_oa & ~((1 << size_lg2) - 1)
            raw = fx.fmt.encode_leaf(base, level, size_lg2, attrs)
            assert all(not raw & b for b in bits)
            for b in bits:
                raw |= b
                assert raw & b
            assert all(raw & b for b in bits)
            dec = fx.fmt.decode(raw, level, fx.features)
            assert (dec.type, dec.addr) == (EntryType.OA, base)
            assert fx.fmt.attrs_from_entry(raw, level) == attrs


@pytest.mark.parametrize("cfg", KUNIT_CONFIGS, ids=KUNIT_IDS)
def test_sw_bit_table(cfg: KunitConfig) -> None:
    fx = make_fixture(cfg)
    if fx.fmt.max_sw_bit is None:
        pytest.skip("format has no software bits")
    bits = _sw_bits(fx)
    paddr = fx.test_oa & ~((1 << fx.smallest_lg2) - 1)
    for level in fx.levels():
        if not fx.fmt.can_hold_table(level):
            continue
        raw = fx.fmt.encode_table(paddr, level, frozenset())
        assert all(not raw & b for b in bits)
        for b in bits:
            raw |= b
        dec = fx.fmt.decode(raw, level, fx.features)
        assert (dec.type, dec.addr) == (EntryType.TABLE, paddr)
