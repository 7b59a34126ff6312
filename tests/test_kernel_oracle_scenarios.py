"""Scenario files, the seeded generator and the VFIO type1 model: no QEMU needed."""

from __future__ import annotations

import errno
import gzip
import json
from pathlib import Path

import pytest

from iommupt_store.errors import BadData, NotFound
from iommupt_store.kernel_oracle.initramfs import newc_archive
from iommupt_store.kernel_oracle.scenario import (
    MapCall,
    UnmapCall,
    generate_calls,
    load_scenario,
    parse_number,
    plan_text,
    shipped_scenarios,
)
from iommupt_store.kernel_oracle.vfio import Dma, DmaList

#: the usable IOVA ranges VFIO reported in the real guests (AMD also reserves the HyperTransport hole)
INTEL_RANGES = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]
AMD_RANGES = [(0, 0xFEDFFFFF), (0xFEF00000, 0xFCFFFFFFFF), (1 << 40, (1 << 48) - 1)]


def write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("text", "value"),
    [(4096, 4096), ("0x1000", 4096), ("64K", 65536), ("2m", 2 << 20), ("1G", 1 << 30), ("0x10K", 16 << 10)],
)
def test_numbers(text: object, value: int) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "12Q", "zz", True, 1.5, None, "0x"])
def test_bad_numbers(text: object) -> None:
    with pytest.raises(ValueError):
        parse_number(text)


def test_a_scenario_file(tmp_path: Path) -> None:
    s = load_scenario(
        write(
            tmp_path,
            {
                "name": "mine",
                "calls": [
                    {"op": "map", "iova": "0x100000", "size": "64K", "buffer": "2m"},
                    {"op": "map", "iova": 1048576, "size": "4K", "expect": "EEXIST"},
                    {"op": "unmap", "iova": "0x100000", "size": "64K"},
                ],
            },
        )
    )
    assert s.calls == [
        MapCall(op="map", iova=0x100000, size=0x10000, buffer="2m"),
        MapCall(op="map", iova=0x100000, size=0x1000, expect="EEXIST"),
        UnmapCall(op="unmap", iova=0x100000, size=0x10000),
    ]
    assert plan_text([s]) == "scenario mine\nmap 100000 10000 2m\nmap 100000 1000 4k\nunmap 100000 10000\nend\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "calls": [{"op": "remap", "iova": 0, "size": 1}]}, "calls.0"),
        ({"name": "x", "calls": [{"op": "map", "iova": "0x", "size": 1}]}, "calls.0.map.iova"),
        ({"name": "x", "calls": [{"op": "map", "iova": 0, "size": "4K", "expect": "EWHAT"}]}, "errno name"),
        ({"name": "x", "calls": [{"op": "map", "iova": 0, "size": "2G"}]}, "1 GiB"),
        ({"name": "x", "calls": [{"op": "map", "iova": 0, "size": "4K", "colour": 1}]}, "colour"),
        ({"name": "x", "calls": [{"op": "map", "iova": -1, "size": "4K"}]}, "iova"),
        ({"name": "x", "calls": [{"op": "map", "iova": 1 << 64, "size": "4K"}]}, "iova"),
        ({"name": "x"}, "either 'calls' or 'random'"),
        (
            {"name": "x", "random": {"seed": 1, "calls": 5}, "calls": [{"op": "unmap", "iova": 0, "size": 1}]},
            "not both",
        ),
        ({"name": "no spaces", "random": {"seed": 1, "calls": 5}}, "name"),
        ({"name": "x", "random": {"seed": 1, "calls": 0}}, "random.calls"),
        ([1, 2], "scenario"),
    ],
)
def test_bad_scenarios_name_the_problem(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(BadData, match=message) as info:
        load_scenario(write(tmp_path, data))
    assert "\n" not in str(info.value)


def test_unreadable_or_missing_scenarios(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BadData, match="not JSON"):
        load_scenario(str(bad))
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(BadData, match=r"cannot read|not JSON"):
        load_scenario(str(bad))
    with pytest.raises(NotFound, match="shipped: basic-4k"):
        load_scenario("no-such-scenario")


def test_shipped_scenarios_are_many_and_long_enough() -> None:
    scenarios = [load_scenario(str(p)) for p in shipped_scenarios()]
    assert len(scenarios) >= 8
    assert sum(1 for s in scenarios if s.random is not None) >= 3
    assert all(len(s.calls) >= 20 for s in scenarios)
    assert len({s.name for s in scenarios}) == len(scenarios)
    calls = [c for s in scenarios for c in s.calls]
    assert {c.expect for c in calls} >= {"ok", "EEXIST", "EINVAL"}
    assert {c.buffer for c in calls if isinstance(c, MapCall)} == {"4k", "2m"}
    assert max(c.iova for c in calls) >= 1 << 47  # IOVAs over the whole 48-bit space


@pytest.mark.parametrize("ranges", [INTEL_RANGES, AMD_RANGES], ids=["intel", "amd"])
@pytest.mark.parametrize("path", shipped_scenarios(), ids=lambda p: p.stem)
def test_shipped_expectations_follow_vfio(path: Path, ranges: list[tuple[int, int]]) -> None:
    """What each shipped scenario expects is what VFIO type1 does with the ranges either vendor offers."""
    s = load_scenario(str(path))
    dmas = DmaList(min_page=4096, iova_ranges=ranges)
    for i, call in enumerate(s.calls):
        if isinstance(call, MapCall):
            err = dmas.check_map(call.iova, call.size)
            if not err:
                dmas.add(Dma(call.iova, call.size))
        else:
            err, hit = dmas.check_unmap(call.iova, call.size)
            dmas.remove(hit)
        assert (errno.errorcode[err] if err else "ok") == call.expect, f"call {i}: {call}"


def test_random_scenarios_are_seeded() -> None:
    assert generate_calls(7, 40) == generate_calls(7, 40)
    assert generate_calls(7, 40) != generate_calls(8, 40)
    calls = generate_calls(11, 200)
    assert len(calls) == 200
    hugepages = sum(-(-c.size // (2 << 20)) for c in calls if isinstance(c, MapCall) and c.buffer == "2m")
    assert hugepages <= 56  # what the guest reserves, with slack


def test_vfio_map_checks() -> None:
    dmas = DmaList(min_page=4096, iova_ranges=INTEL_RANGES)
    assert dmas.check_map(0x1000, 0x2000) == 0
    dmas.add(Dma(0x1000, 0x2000))
    assert dmas.check_map(0x2000, 0x1000) == errno.EEXIST
    assert dmas.check_map(0x0, 0x2000) == errno.EEXIST
    assert dmas.check_map(0x3000, 0x1000) == 0
    assert dmas.check_map(0x3800, 0x1000) == errno.EINVAL  # unaligned
    assert dmas.check_map(0x4000, 0) == errno.EINVAL
    assert dmas.check_map(0xFEE00000, 0x1000) == errno.EINVAL  # the MSI window
    assert dmas.check_map(0xFEDFF000, 0x2000) == errno.EINVAL  # runs into it
    assert dmas.check_map(1 << 48, 0x1000) == errno.EINVAL
    assert dmas.check_map((1 << 64) - 0x1000, 0x2000) == errno.EINVAL  # wraps


def test_vfio_unmap_never_splits() -> None:
    dmas = DmaList(min_page=4096, iova_ranges=INTEL_RANGES)
    for iova in (0x10000, 0x20000, 0x40000):
        dmas.add(Dma(iova, 0x2000))
    assert dmas.check_unmap(0x11000, 0x1000) == (errno.EINVAL, [])
    assert dmas.check_unmap(0x10000, 0x1000) == (errno.EINVAL, [])
    err, hit = dmas.check_unmap(0x10000, 0x12000)
    assert (err, [d.iova for d in hit]) == (0, [0x10000, 0x20000])
    assert dmas.check_unmap(0x30000, 0x1000) == (0, [])  # a hole: nothing, no error
    assert dmas.check_unmap(0x0, 0x1800)[0] == errno.EINVAL


def test_newc_archive_layout() -> None:
    blob = newc_archive([("init", 0o100755, b"#!/bin/sh\n"), ("bin", 0o40755, b"")])
    assert blob.startswith(b"070701")
    assert len(blob) % 4 == 0
    assert b"init\0" in blob and b"#!/bin/sh\n" in blob
    assert blob.rstrip(b"\0").endswith(b"TRAILER!!!")
    # gzip'd as the kernel takes it
    assert gzip.decompress(gzip.compress(blob)) == blob
