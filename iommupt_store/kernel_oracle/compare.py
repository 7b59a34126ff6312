"""Comparing the kernel's side of a scenario with ours: every word of every table (only the
addresses inside table pointers are masked: the two sides allocate frames differently), the set of
leaves, each call's result, the top level and the page-size bitmap."""

from __future__ import annotations

import errno as errno_mod
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import BadData
from .capture import ScenarioCapture, Table
from .decode import ADDR_MASK, DECODERS, Item, describe, item_shift

MAX_LISTED = 200  # differences kept per scenario; the count is always exact


class Difference(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["pgsizes", "top_level", "call", "expect", "word", "leaf"]
    where: str
    kernel: str
    ours: str


class ScenarioReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    scenario: str
    vendor: str
    calls: int
    tables: int
    words: int
    leaves: int
    difference_count: int
    differences: list[Difference] = Field(default_factory=list)

    @property
    def matches(self) -> bool:
        return self.difference_count == 0


def errno_text(err: int) -> str:
    return "ok" if err == 0 else errno_mod.errorcode.get(err, str(err))


def compare(kernel: ScenarioCapture, ours: ScenarioCapture, expected: list[str] | None = None) -> ScenarioReport:
    """``expected``: the scenario's expected result per call (``ok`` or an errno name), if known."""
    diffs: list[Difference] = []
    if kernel.pgsizes != ours.pgsizes:
        diffs.append(
            Difference(
                kind="pgsizes", where="page-size bitmap", kernel=f"{kernel.pgsizes:#x}", ours=f"{ours.pgsizes:#x}"
            )
        )
    if kernel.top_level != ours.top_level:
        diffs.append(
            Difference(kind="top_level", where="top level", kernel=str(kernel.top_level), ours=str(ours.top_level))
        )
    for i, (k, o) in enumerate(zip(kernel.calls, ours.calls, strict=True)):
        where = f"call {i}: {k.op} {k.iova:#x} size {k.size:#x}"
        k_text, o_text = _result_text(k.op, k.errno, k.unmapped), _result_text(o.op, o.errno, o.unmapped)
        if k_text != o_text:
            diffs.append(Difference(kind="call", where=where, kernel=k_text, ours=o_text))
        if expected is not None and errno_text(k.errno) != expected[i]:
            diffs.append(
                Difference(kind="expect", where=where, kernel=errno_text(k.errno), ours=f"expected {expected[i]}")
            )
    tables, words = 0, 0
    if kernel.top_level == ours.top_level:
        tables, words = _compare_tables(kernel, ours, diffs)
    k_leaves, o_leaves = leaves(kernel), leaves(ours)
    for va, size, oa in sorted(k_leaves - o_leaves):
        diffs.append(Difference(kind="leaf", where=f"iova {va:#x}", kernel=f"{size:#x} at {oa:#x}", ours="missing"))
    for va, size, oa in sorted(o_leaves - k_leaves):
        diffs.append(Difference(kind="leaf", where=f"iova {va:#x}", kernel="missing", ours=f"{size:#x} at {oa:#x}"))
    return ScenarioReport(
        scenario=kernel.scenario,
        vendor=kernel.vendor,
        calls=len(kernel.calls),
        tables=tables,
        words=words,
        leaves=len(k_leaves),
        difference_count=len(diffs),
        differences=diffs[:MAX_LISTED],
    )


def _result_text(op: str, err: int, unmapped: int) -> str:
    if err or op == "map":
        return errno_text(err)
    return f"ok, {unmapped:#x} bytes"


def _compare_tables(kernel: ScenarioCapture, ours: ScenarioCapture, diffs: list[Difference]) -> tuple[int, int]:
    decode = DECODERS[kernel.vendor]
    tables = words = 0
    todo = [(kernel.top, ours.top, kernel.top_level, 0)]
    while todo:
        k_phys, o_phys, level, base = todo.pop()
        k_table, o_table = _table(kernel, k_phys, level), _table(ours, o_phys, level)
        tables += 1
        for i in range(512):
            kw, ow = k_table.words.get(i, 0), o_table.words.get(i, 0)
            words += 1
            ki, oi = decode(kw, level), decode(ow, level)
            va = base + (i << item_shift(level))
            if ki.kind == "table" and oi.kind == "table":
                if kw & ~ADDR_MASK != ow & ~ADDR_MASK:
                    diffs.append(_word_diff(level, i, va, kw, ow, ki, oi))
                todo.append((ki.addr, oi.addr, level - 1, va))
            elif kw != ow:
                diffs.append(_word_diff(level, i, va, kw, ow, ki, oi))
    return tables, words


def _table(capture: ScenarioCapture, phys: int, level: int) -> Table:
    table = capture.tables.get(phys)
    if table is None or table.level != level:
        raise BadData(f"{capture.kernel} capture of {capture.scenario}: no level-{level} table at {phys:#x}")
    return table


def _word_diff(level: int, index: int, va: int, kw: int, ow: int, ki: Item, oi: Item) -> Difference:
    return Difference(
        kind="word",
        where=f"level {level} index {index} (iova {va:#x})",
        kernel=f"{kw:#018x} {describe(ki)}",
        ours=f"{ow:#018x} {describe(oi)}",
    )


def leaves(capture: ScenarioCapture) -> set[tuple[int, int, int]]:
    """(iova, size, output address) of every leaf reachable from the top."""
    decode = DECODERS[capture.vendor]
    out: set[tuple[int, int, int]] = set()
    todo = [(capture.top, capture.top_level, 0)]
    while todo:
        phys, level, base = todo.pop()
        table: Table | None = capture.tables.get(phys)
        if table is None:
            continue
        for i, word in table.words.items():
            item = decode(word, level)
            va = base + (i << item_shift(level))
            if item.kind == "table" and level > 0:
                todo.append((item.addr, level - 1, va))
            elif item.kind == "leaf":
                out.add((va & ~(item.size - 1), item.size, item.addr))
    return out
