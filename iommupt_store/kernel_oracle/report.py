"""The result of an oracle run, as one JSON document or as text for a person."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from .compare import ScenarioReport

LISTED_PER_SCENARIO = 20


class VendorRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    vendor: str
    #: one guest boot for the whole batch, dumps included (0 when compared from a saved capture)
    seconds: float


class RunReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    kernel: str
    runs: list[VendorRun]
    scenarios: list[ScenarioReport]
    calls: int
    tables: int
    words: int
    leaves: int
    differences: int

    @property
    def matches(self) -> bool:
        return self.differences == 0


def summarize(kernel: str, runs: list[VendorRun], reports: list[ScenarioReport]) -> RunReport:
    return RunReport(
        kernel=kernel,
        runs=runs,
        scenarios=reports,
        calls=sum(r.calls for r in reports),
        tables=sum(r.tables for r in reports),
        words=sum(r.words for r in reports),
        leaves=sum(r.leaves for r in reports),
        differences=sum(r.difference_count for r in reports),
    )


def render(report: RunReport) -> str:
    lines = []
    for r in report.scenarios:
        verdict = "match" if r.matches else f"DIFFERENT ({r.difference_count})"
        lines.append(
            f"{r.vendor:8} {r.scenario:24} {r.calls:4} calls {r.tables:4} tables {r.words:8,} words "
            f"{r.leaves:6,} leaves  {verdict}"
        )
        for d in r.differences[:LISTED_PER_SCENARIO]:
            lines.append(f"    {d.kind}: {d.where}")
            lines.append(f"        kernel: {d.kernel}")
            lines.append(f"        ours:   {d.ours}")
        if r.difference_count > LISTED_PER_SCENARIO:
            lines.append(f"    ... {r.difference_count - LISTED_PER_SCENARIO} more (--json lists up to 200)")
    timing = ", ".join(f"{v.vendor} {v.seconds:.1f} s" for v in report.runs if v.seconds)
    lines.append(
        f"{len(report.scenarios)} scenario runs against Linux {report.kernel}: {report.calls:,} calls, "
        f"{report.tables:,} tables, {report.words:,} words, {report.leaves:,} leaves compared; "
        f"{report.differences} difference(s)" + (f"; guest time {timing}" if timing else "")
    )
    return "\n".join(lines)
