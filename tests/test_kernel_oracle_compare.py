"""Replay and compare against tables recorded from the real 7.3.4 kernel: no QEMU needed.

``data/kernel-7.3.4-capture.json.gz`` holds what the kernel did in five shipped scenarios on each
vendor (Intel second stage, AMD v1, Intel first stage: results, physical runs, every table), recorded
with ``run --save-capture``.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from iommupt_store import formats
from iommupt_store.kernel_oracle import replay as replay_mod
from iommupt_store.kernel_oracle.capture import Capture, ScenarioCapture, Table
from iommupt_store.kernel_oracle.compare import compare
from iommupt_store.kernel_oracle.decode import ADDR_MASK, decode_amd, decode_intel
from iommupt_store.kernel_oracle.replay import new_domain, replay
from iommupt_store.kernel_oracle.report import render, summarize
from iommupt_store.pagetable import engine

RECORDED = Path(__file__).parent / "data" / "kernel-7.3.4-capture.json.gz"


def recorded() -> list[ScenarioCapture]:
    return Capture.model_validate_json(gzip.decompress(RECORDED.read_bytes())).scenarios


def by(vendor: str, name: str) -> ScenarioCapture:
    return next(s for s in recorded() if s.vendor == vendor and s.scenario == name)


@pytest.mark.parametrize("kernel", recorded(), ids=lambda s: f"{s.vendor}-{s.scenario}")
def test_recorded_kernel_tables_match_word_for_word(kernel: ScenarioCapture) -> None:
    report = compare(kernel, replay(kernel))
    assert report.differences == []
    assert report.tables == len(kernel.tables) and report.words == 512 * report.tables
    assert report.tables > 0 and report.calls >= 20


def test_the_kernels_page_size_bitmaps() -> None:
    expected = {"intel": 0x40201000, "amd": 0x7F7FFFFFF000, "intel-fs": 0x40201000}
    assert {s.vendor: s.pgsizes for s in recorded()} == expected
    assert {v: new_domain(v).pgsize_bitmap for v in expected} == expected  # type: ignore[arg-type]


def test_the_recording_covers_what_matters() -> None:
    amd = [s for s in recorded() if s.vendor == "amd"]
    assert {s.top_level for s in amd} >= {3}  # the AMD top grew from 3 to 4 levels
    contiguous = [w for s in amd for t in s.tables.values() for w in t.words.values() if w >> 9 & 7 == 7]
    assert contiguous  # real NL=7 entries
    assert any(not t.words for s in recorded() for t in s.tables.values())  # empty tables left by unmaps
    assert any(c.errno for s in recorded() for c in s.calls)  # refused calls


def test_seed_era_page_sizes_fail_with_a_readable_diff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flip the get_info rule back to the seed's era: the AMD bitmap offers 128 TiB again."""

    def seed_era(fmt: formats.PageTableFormat, geometry: formats.Geometry, features: formats.Features) -> int:
        bitmap = 0
        for level in formats.leaf_levels(fmt, geometry, features):
            bitmap |= formats.possible_sizes(fmt, level, features)
        return bitmap & ((1 << geometry.max_oasz_lg2) - 1)

    monkeypatch.setattr(engine, "format_pgsize_bitmap", seed_era)
    report = compare(by("amd", "top-growth"), replay(by("amd", "top-growth")))
    assert [(d.kind, d.kernel, d.ours) for d in report.differences] == [("pgsizes", "0x7f7ffffff000", "0xff7ffffff000")]
    text = render(summarize("7.3.4", [], [report]))
    assert "DIFFERENT (1)" in text
    assert "kernel: 0x7f7ffffff000" in text and "ours:   0xff7ffffff000" in text


def test_seed_era_x86_64_without_dma_incoherent_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed's era built DMA_INCOHERENT into debug builds only: its first-stage table pointers lack
    the 'flushed' software bit that Linux 7.3 sets behind QEMU's non-snooping IOMMU."""
    setup = replay_mod.DRIVER_SETUP["intel-fs"]
    monkeypatch.setitem(
        replay_mod.DRIVER_SETUP,
        "intel-fs",
        replace(setup, features=setup.features - {formats.Feature.DMA_INCOHERENT}),
    )
    kernel = by("intel-fs", "basic-4k")
    report = compare(kernel, replay(kernel))
    assert report.difference_count == report.tables - 1  # every table pointer, nothing else
    first = report.differences[0]
    assert first.kind == "word" and first.kernel.endswith("table (P RW US A)")
    assert (int(first.kernel.split()[0], 16) ^ int(first.ours.split()[0], 16)) & ~ADDR_MASK == 0x200


def test_a_wrong_page_size_choice_fails_with_a_readable_diff(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that never picks a 2M page where it could builds other tables than Linux."""
    real = engine.compute_best_pgsize

    def only_small(bitmap: int, va: int, last_va: int, oa: int) -> int:
        return real(bitmap & ((1 << 21) - 1), va, last_va, oa)

    monkeypatch.setattr(engine, "compute_best_pgsize", only_small)
    kernel = by("intel", "table-free")
    report = compare(kernel, replay(kernel))
    assert report.difference_count > 0
    words = [d for d in report.differences if d.kind == "word"]
    assert words and "2M page at" in words[0].kernel and "table" in words[0].ours
    assert words[0].where.startswith("level 1 index ")
    leaves = [d for d in report.differences if d.kind == "leaf"]
    assert leaves and any(d.ours == "missing" and d.kernel.startswith("0x200000 at") for d in leaves)
    text = render(summarize("7.3.4", [], [report]))
    assert "intel    table-free" in text and "kernel: 0x" in text and "    word: level 1 index" in text


def test_a_changed_kernel_word_is_reported_with_both_decodings() -> None:
    kernel = by("amd", "basic-4k")
    phys, table = next((p, t) for p, t in kernel.tables.items() if t.level == 0 and t.words)
    index, word = next(iter(table.words.items()))
    tampered_table = Table(level=0, words={**table.words, index: word ^ (1 << 62)})  # drop IW
    tampered = kernel.model_copy(update={"tables": {**kernel.tables, phys: tampered_table}})
    report = compare(tampered, replay(kernel))
    word_diffs = [d for d in report.differences if d.kind == "word"]
    assert len(word_diffs) == 1
    assert f"index {index} " in word_diffs[0].where
    assert "(PR IR FC)" in word_diffs[0].kernel and "(PR IR IW FC)" in word_diffs[0].ours


def test_a_changed_call_result_is_reported() -> None:
    kernel = by("intel", "refused-calls")
    calls = list(kernel.calls)
    i = next(i for i, c in enumerate(calls) if c.errno)
    calls[i] = calls[i].model_copy(update={"errno": 0})
    report = compare(kernel.model_copy(update={"calls": calls}), replay(kernel))
    assert [(d.kind, d.kernel, d.ours) for d in report.differences] == [("call", "ok", "EEXIST")]


def test_decoders() -> None:
    assert decode_intel(0, 0).kind == "empty"
    assert decode_intel(0x1234003, 1) == ("table", 0x1234000, 0, "R W")
    assert decode_intel(0x40000883, 1) == ("leaf", 0x40000000, 2 << 20, "R W SNP")
    assert decode_intel(0x5003, 0) == ("leaf", 0x5000, 4096, "R W")
    assert decode_amd(0x6000000001234601, 3).kind == "table"
    assert decode_amd(0x6000000000005001, 0) == ("leaf", 0x5000, 4096, "PR IR IW")
    # NL=7: one 1 bit from bit 12 makes a 16K entry, none an 8K one
    assert decode_amd(0x6000000000005E01, 0)[:3] == ("leaf", 0x4000, 16384)
    assert decode_amd(0x6000000000006E01, 0)[:3] == ("leaf", 0x6000, 8192)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iommupt_store.kernel_oracle", *args], capture_output=True, text=True, check=False
    )


def test_cli_compare_a_capture(tmp_path: Path) -> None:
    capture = tmp_path / "c.json"
    capture.write_bytes(gzip.decompress(RECORDED.read_bytes()))
    ok = run_cli("compare", str(capture))
    assert ok.returncode == 0, ok.stderr
    assert "0 difference(s)" in ok.stderr and "match" in ok.stderr
    as_json = run_cli("compare", str(capture), "--json")
    assert as_json.returncode == 0 and '"differences": 0' in as_json.stdout

    data = Capture.model_validate_json(capture.read_text())
    first = data.scenarios[0]
    pgs = first.model_copy(update={"pgsizes": first.pgsizes | 1 << 47})
    capture.write_text(Capture(scenarios=[pgs]).model_dump_json())
    bad = run_cli("compare", str(capture))
    assert bad.returncode == 1
    assert "DIFFERENT (1)" in bad.stderr and "pgsizes: page-size bitmap" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("content", [b"", b"{}", b"not json", b'{"scenarios": [{"vendor": "arm"}]}', b"\xff"])
def test_cli_bad_capture_is_one_line(tmp_path: Path, content: bytes) -> None:
    capture = tmp_path / "c.json"
    capture.write_bytes(content)
    r = run_cli("compare", str(capture))
    assert r.returncode == 65
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_cli_usage_and_missing_things(tmp_path: Path) -> None:
    assert run_cli("run", "--vendor", "arm").returncode == 2
    missing = run_cli("compare", str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    not_set_up = run_cli("run", "basic-4k", "--cache", str(tmp_path / "empty"))
    assert not_set_up.returncode == 1
    assert "error: " in not_set_up.stderr and "Traceback" not in not_set_up.stderr
    bad = tmp_path / "s.json"
    bad.write_text('{"name": "x", "calls": [{"op": "map"}]}')
    r = run_cli("run", str(bad), "--cache", str(tmp_path / "empty"))
    assert r.returncode == 65 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    listed = run_cli("list")
    assert listed.returncode == 0 and "random-1" in listed.stdout
