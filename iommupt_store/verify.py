"""Whole-domain verification: every translation of a domain, checked as the IOMMU would see it.

``verify_domain`` walks a domain's frames from its top the way the hardware
walker does (entry bits only, through the format's ``scan_frame``) and
compares what they translate with an expectation: runs the caller gives
(``ExpectedRun``: iova, phys, length, prot), or by default the mapping runs
recorded for the domain (``mappings``). It streams: frames are read in
pfn-ordered batches of at most one table's children, leaves are joined into
runs as they are found, and the comparison is a merge of two sorted run
streams, so memory does not grow with the domain. The answer is a
``VerifyReport``: a summary and the differences as maximal runs (missing,
unexpected, wrong phys, wrong permissions), the first ``max_differences`` of
them listed and all of them counted.

A translation is an IOVA's physical address and whether a device may read and
write it; page sizes and other attribute bits are not compared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from sqlalchemy import BigInteger, func, literal, select

from .db.models import MappingRun, Page
from .db.rows import reads_stored_rows
from .domains import frame_bytes, stored_geometry, walkable_row
from .errors import InvalidArgument, IommuptError
from .formats.base import ITEMS_PER_TABLE, Feature, PageTableFormat, item_lg2sz
from .formats.describe import permissions
from .machine import Transaction
from .memory import PAGE_SHIFT
from .pagetable.walker import WalkError
from .reports import HexInt, Report
from .units import U64_MAX, parse_number, parse_prot

__all__ = [
    "DEFAULT_MAX_DIFFERENCES",
    "Difference",
    "ExpectedRun",
    "VerifyReport",
    "VerifySummary",
    "parse_expectation",
    "verify_domain",
]

#: how many differing runs a report lists by default (all of them are counted)
DEFAULT_MAX_DIFFERENCES = 20

_SIGN = 1 << 63
_2_64 = 1 << 64

Progress = Callable[[int, int], None]


# -- what the caller expects ---------------------------------------------------------------------
def _text_as(parse: Callable[[str], int]) -> Callable[[Any], Any]:
    """A validator that leaves JSON numbers alone and parses strings (``0x1000``, ``2M``, ``rw``)."""

    def validate(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return parse(value)
        except IommuptError as e:
            raise ValueError(e.args[0] if e.args else str(e)) from None

    return validate


_number, _prot = _text_as(parse_number), _text_as(parse_prot)


class ExpectedRun(BaseModel):
    """``length`` bytes from ``iova`` that should translate to ``phys`` onwards with ``prot``.

    ``prot`` is what the range was (or should have been) mapped with: ``Prot`` bits or letters
    (``"rw"``, ``"r"``); it is compared as the domain's format encodes it, so on x86_64 a
    write-only mapping is also readable. Upper-half IOVAs are given sign-extended, as the
    hardware sees them. In JSON every number may be an integer or a string (``"0x1000"``, ``"2M"``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    iova: Annotated[int, BeforeValidator(_number), Field(ge=0, le=U64_MAX)]
    phys: Annotated[int, BeforeValidator(_number), Field(ge=0, le=U64_MAX)]
    length: Annotated[int, BeforeValidator(_number), Field(gt=0, le=_2_64)]
    prot: Annotated[int, BeforeValidator(_prot), Field(ge=0, le=0xFF)] = 3

    @model_validator(mode="after")
    def _fits(self) -> ExpectedRun:
        if self.iova + self.length > _2_64:
            raise ValueError(f"[{self.iova:#x}, +{self.length:#x}) runs past the end of the 64-bit IOVA space")
        return self


_EXPECTATION: TypeAdapter[list[ExpectedRun]] = TypeAdapter(list[ExpectedRun])


def parse_expectation(text: str | bytes) -> list[ExpectedRun]:
    """A JSON list of runs (``[{"iova": "0x0", "phys": "0x100000", "length": "2M", "prot": "rw"}]``);
    InvalidArgument with one line naming the first problem otherwise."""
    try:
        return _EXPECTATION.validate_json(text)
    except ValidationError as e:
        err = e.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "json_invalid":
            raise InvalidArgument(f"the expectation is not valid JSON: {msg}") from None
        if not err["loc"]:
            raise InvalidArgument(f"the expectation must be a JSON list of runs: {msg}") from None
        where = "expectation run " + ".".join(str(p) for p in err["loc"])
        raise InvalidArgument(f"{where}: {msg}") from None


# -- the report ------------------------------------------------------------------------------------
class VerifySummary(Report):
    #: 4 KiB translations the frames hold (bytes_mapped / 4096), every one compared
    translations: int
    bytes_mapped: int
    bytes_expected: int
    bytes_matching: int
    #: leaf entries decoded (a contiguous entry counts once)
    leaf_entries: int
    #: table frames read from the database (the domain holds ``frames_stored``)
    frames_read: int
    frames_stored: int
    runs_found: int
    runs_expected: int


Kind = Literal["missing", "unexpected", "wrong_phys", "wrong_permissions"]


class Difference(Report):
    """``length`` bytes from ``iova`` that translate otherwise than expected.

    ``missing``: expected, not translated; ``unexpected``: translated, not expected;
    ``wrong_phys``: translated elsewhere; ``wrong_permissions``: right address, other rights.
    Permissions read ``rw``, ``r-``, ``-w`` or ``--``.
    """

    kind: Kind
    iova: HexInt
    length: int
    expected_phys: HexInt | None = None
    found_phys: HexInt | None = None
    expected_prot: str | None = None
    found_prot: str | None = None


class VerifyReport(Report):
    domain_id: int
    format: str
    #: "recorded mapping runs" or "the given runs"
    against: str
    ok: bool
    summary: VerifySummary
    differences: list[Difference]
    #: every difference, listed or not
    differences_total: int


# -- runs of translations: (iova, phys, length, readable, writable) -------------------------------
_TRun = tuple[int, int, int, bool, bool]


def _joined(runs: Iterable[_TRun]) -> Iterator[_TRun]:
    """Neighbouring runs that continue each other as one (never across 2^63, like the ledger)."""
    cur: _TRun | None = None
    for run in runs:
        if (
            cur is not None
            and run[0] == cur[0] + cur[2]
            and run[1] == cur[1] + cur[2]
            and run[3:] == cur[3:]
            and run[0] != _SIGN
        ):
            cur = (cur[0], cur[1], cur[2] + run[2], cur[3], cur[4])
            continue
        if cur is not None:
            yield cur
        cur = run
    if cur is not None:
        yield cur


def _perm(readable: bool, writable: bool) -> str:
    return ("r" if readable else "-") + ("w" if writable else "-")


class _Differences:
    """Collects differences, joining neighbours of one kind, keeping the first ``cap``."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.listed: list[Difference] = []
        self.total = 0
        self._cur: dict[str, Any] | None = None

    def add(self, kind: Kind, iova: int, length: int, exp: _TRun | None, found: _TRun | None) -> None:
        e_phys = exp[1] + (iova - exp[0]) if exp else None
        f_phys = found[1] + (iova - found[0]) if found else None
        e_prot = _perm(exp[3], exp[4]) if exp else None
        f_prot = _perm(found[3], found[4]) if found else None
        cur = self._cur
        if (
            cur is not None
            and cur["kind"] == kind
            and cur["iova"] + cur["length"] == iova
            and (e_phys is None) == (cur["expected_phys"] is None)
            and (e_phys is None or cur["expected_phys"] + cur["length"] == e_phys)
            and (f_phys is None) == (cur["found_phys"] is None)
            and (f_phys is None or cur["found_phys"] + cur["length"] == f_phys)
            and (cur["expected_prot"], cur["found_prot"]) == (e_prot, f_prot)
        ):
            cur["length"] += length
            return
        self.close()
        self._cur = {
            "kind": kind,
            "iova": iova,
            "length": length,
            "expected_phys": e_phys,
            "found_phys": f_phys,
            "expected_prot": e_prot,
            "found_prot": f_prot,
        }

    def close(self) -> None:
        if self._cur is not None:
            self.total += 1
            if len(self.listed) < self.cap:
                self.listed.append(Difference(**self._cur))
            self._cur = None


class _Counts:
    def __init__(self) -> None:
        self.bytes = 0
        self.runs = 0


def _counted(runs: Iterable[_TRun], counts: _Counts) -> Iterator[_TRun]:
    for run in runs:
        counts.bytes += run[2]
        counts.runs += 1
        yield run


def _compare(expected: Iterator[_TRun], found: Iterator[_TRun], diffs: _Differences) -> int:
    """Merge two ascending, non-overlapping run streams; returns the bytes that match."""
    matching = 0
    e, f = next(expected, None), next(found, None)
    while e is not None or f is not None:
        if f is None or (e is not None and e[0] + e[2] <= f[0]):
            assert e is not None
            diffs.add("missing", e[0], e[2], e, None)
            e = next(expected, None)
            continue
        if e is None or f[0] + f[2] <= e[0]:
            diffs.add("unexpected", f[0], f[2], None, f)
            f = next(found, None)
            continue
        # They overlap: first whichever part of one starts before the other.
        if e[0] < f[0]:
            diffs.add("missing", e[0], f[0] - e[0], e, None)
            e = _rest(e, f[0])
        elif f[0] < e[0]:
            diffs.add("unexpected", f[0], e[0] - f[0], None, f)
            f = _rest(f, e[0])
        start, end = e[0], min(e[0] + e[2], f[0] + f[2])
        if e[1] != f[1]:
            diffs.add("wrong_phys", start, end - start, e, f)
        elif e[3:] != f[3:]:
            diffs.add("wrong_permissions", start, end - start, e, f)
        else:
            matching += end - start
        e = _rest(e, end) if e[0] + e[2] > end else next(expected, None)
        f = _rest(f, end) if f[0] + f[2] > end else next(found, None)
    diffs.close()
    return matching


def _rest(run: _TRun, at: int) -> _TRun:
    """What is left of ``run`` from IOVA ``at`` on."""
    skip = at - run[0]
    return (at, run[1] + skip, run[2] - skip, run[3], run[4])


# -- the expectations -------------------------------------------------------------------------------
def _given(runs: Iterable[ExpectedRun], fmt: PageTableFormat, features: frozenset[Feature]) -> Iterator[_TRun]:
    """The caller's runs, checked to ascend without overlapping, with the rights ``prot`` gives."""
    rights: dict[int, tuple[bool, bool]] = {}
    end = 0
    for run in runs:
        if run.iova < end:
            raise InvalidArgument(
                f"expected run at {run.iova:#x} overlaps or precedes the one before: give runs in ascending IOVA order"
            )
        end = run.iova + run.length
        if run.prot not in rights:
            try:
                rights[run.prot] = permissions(fmt.name, fmt.leaf_attrs(run.prot, features))
            except IommuptError as e:
                raise InvalidArgument(f"expected run at {run.iova:#x}: prot {run.prot:#x}: {e}") from None
        yield (run.iova, run.phys, run.length, *rights[run.prot])


_R = MappingRun.__table__.c


def _recorded(tx: Transaction, domain_id: int) -> Iterator[_TRun]:
    """The ledger's runs of the domain in ascending unsigned IOVA order, streamed: the lower half,
    then the upper half (stored as negative numbers, see ``db.types.U64``)."""
    cols = (_R.iova, _R.phys, _R.size, _R.readable, _R.writable)
    stored = _R.iova.cast(BigInteger)  # compare the stored two's complement, not an unsigned bind
    for half in (stored >= literal(0, BigInteger), stored < literal(0, BigInteger)):
        rows = tx.conn.execute(
            select(*cols).where(_R.domain_id == domain_id, half).order_by(_R.iova).execution_options(yield_per=1000)
        )
        for iova, phys, size, readable, writable in rows:
            yield (iova, phys, size, bool(readable), bool(writable))


# -- the walk ---------------------------------------------------------------------------------------
class _Walk:
    """A domain's leaves from its top, as runs ``(iova, phys, length, readable, writable)``."""

    def __init__(self, tx: Transaction, domain_id: int, row: Any, frames_stored: int, progress: Progress | None):
        self.tx = tx
        self.domain_id = domain_id
        self.fmt, features, self.vasz = stored_geometry(row)
        self.sign_extend = self.fmt.effective(Feature.SIGN_EXTEND, features) and self.vasz < 64
        self.top_phys: int = row["top_phys"]
        self.top_level: int = row["top_level"]
        self.frames_stored = frames_stored
        self.frames_read = 0
        self.leaf_entries = 0
        self.progress = progress
        self._rights: dict[int, tuple[bool, bool]] = {}

    def runs(self) -> Iterator[_TRun]:
        top = self._read([self.top_phys])[self.top_phys >> PAGE_SHIFT]
        n = 1 << (self.vasz - item_lg2sz(self.top_level))
        yield from self._table(top, self.top_level, 0, min(n, ITEMS_PER_TABLE), True)

    def _read(self, addrs: list[int]) -> dict[int, bytes]:
        """The frames at ``addrs`` (one query, in pfn order)."""
        pfns = sorted({a >> PAGE_SHIFT for a in addrs})
        rows = self.tx.conn.execute(
            select(Page.pfn, Page.page_order, Page.contents)
            .where(Page.machine_id == self.tx.machine.id, Page.domain_id == self.domain_id, Page.pfn.in_(pfns))
            .order_by(Page.pfn)
        )
        out = {pfn: frame_bytes(pfn, order, contents) for pfn, order, contents in rows}
        if len(out) != len(pfns):
            gone = min(set(pfns) - out.keys())
            raise WalkError(
                f"domain {self.domain_id}: table pointer to {gone << PAGE_SHIFT:#x}, "
                "which is not a frame of this domain"
            )
        self.frames_read += len(addrs)
        if self.frames_read > self.frames_stored:
            raise WalkError(
                f"domain {self.domain_id}: the walk reaches more tables than the domain's "
                f"{self.frames_stored} frames: a table is reachable twice (cycle or shared table)"
            )
        if self.progress is not None:
            self.progress(self.frames_read, self.frames_stored)
        return out

    def _rights_of(self, raw: int) -> tuple[bool, bool]:
        attrs = raw & ~self.fmt.oa_mask
        rights = self._rights.get(attrs)
        if rights is None:
            rights = self._rights[attrs] = permissions(self.fmt.name, raw)
        return rights

    def _table(self, data: bytes, level: int, base: int, n: int, top: bool) -> Iterator[_TRun]:
        runs = self.fmt.scan_frame(data, level, n)
        pointers = [r.addr for r in runs if r.table]
        children: dict[int, bytes] = {}
        if pointers:
            if level == 0:
                raise WalkError(f"domain {self.domain_id}: a level-0 table holds a table pointer")
            children = self._read(pointers)
        shift = item_lg2sz(level)
        for r in runs:
            va = self._top_base(r.first, shift) if top else base + (r.first << shift)
            if r.table:
                yield from self._table(children[r.addr >> PAGE_SHIFT], level - 1, va, ITEMS_PER_TABLE, False)
                continue
            self.leaf_entries += r.entries
            length = r.items << shift
            readable, writable = self._rights_of(r.raw)
            if top and self.sign_extend and r.first < n // 2 < r.first + r.items:
                # a top-level run across the middle: the hardware sees its second part sign-extended
                first = (n // 2 - r.first) << shift
                yield (va, r.addr, first, readable, writable)
                yield (self._top_base(n // 2, shift), r.addr + first, length - first, readable, writable)
                continue
            yield (va, r.addr, length, readable, writable)

    def _top_base(self, index: int, shift: int) -> int:
        """The IOVA of top-table item ``index`` (sign-extended in the upper half)."""
        va = index << shift
        if self.sign_extend and (va >> (self.vasz - 1)) & 1:
            va |= U64_MAX ^ ((1 << self.vasz) - 1)
        return va


@reads_stored_rows
def verify_domain(
    tx: Transaction,
    domain_id: int,
    expect: Iterable[ExpectedRun] | None = None,
    *,
    max_differences: int = DEFAULT_MAX_DIFFERENCES,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check every translation of domain ``domain_id`` against ``expect`` (runs in ascending IOVA
    order) or, without it, against the mapping runs recorded for the domain.

    Reads only (an observer's read-only transaction is enough); ``progress(done, total)`` is
    called with table frames read so far and the domain's frame count. Raises NotFound for a
    domain that does not exist or has been freed, BadData (``WalkError``) when the tables cannot
    be walked, InvalidArgument for an expectation out of order or with a ``prot`` the format refuses.
    """
    if max_differences < 0:
        raise InvalidArgument(f"max_differences must be 0 or more, got {max_differences}")
    row = walkable_row(tx, domain_id)
    frames_stored = tx.conn.execute(
        select(func.count()).select_from(Page).where(Page.machine_id == tx.machine.id, Page.domain_id == domain_id)
    ).scalar_one()
    walk = _Walk(tx, domain_id, row, frames_stored, progress)
    if expect is None:
        against, wanted = "recorded mapping runs", _recorded(tx, domain_id)
    else:
        fmt, features, _ = stored_geometry(row)
        against, wanted = "the given runs", _given(expect, fmt, features)
    found_counts, wanted_counts = _Counts(), _Counts()
    diffs = _Differences(max_differences)
    matching = _compare(_counted(_joined(wanted), wanted_counts), _counted(_joined(walk.runs()), found_counts), diffs)
    summary = VerifySummary(
        translations=found_counts.bytes >> PAGE_SHIFT,
        bytes_mapped=found_counts.bytes,
        bytes_expected=wanted_counts.bytes,
        bytes_matching=matching,
        leaf_entries=walk.leaf_entries,
        frames_read=walk.frames_read,
        frames_stored=frames_stored,
        runs_found=found_counts.runs,
        runs_expected=wanted_counts.runs,
    )
    return VerifyReport(
        domain_id=domain_id,
        format=walk.fmt.name,
        against=against,
        ok=diffs.total == 0,
        summary=summary,
        differences=diffs.listed,
        differences_total=diffs.total,
    )
