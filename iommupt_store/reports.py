"""What the API returns for display: pydantic models, dumped as-is by ``--json``."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict


class Report(BaseModel):
    model_config = ConfigDict(frozen=True)


class BootInfo(Report):
    number: int
    started_at: dt.datetime
    ended_at: dt.datetime | None = None
    end_kind: str | None = None


class MachineStatus(Report):
    name: str
    mem_bytes: int
    page_size: int
    pages_allocated: int
    bytes_allocated: int
    boots: list[BootInfo]

    @property
    def current_boot(self) -> BootInfo | None:
        return self.boots[-1] if self.boots else None


class StoreStatus(Report):
    url: str
    revision: str
    machines: list[MachineStatus]
