"""Where the engine gets its table frames from.

The engine sees table memory only through ``FrameStore``: allocate a zeroed
4 KiB table, view one as 512 u64 words (read-only or writable), free a list of
tables. ``memory_frames`` in ``iommupt_store.domains`` backs it with machine
memory; ``DictFrames`` keeps frames in a dict, for tests that need no database.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

TABLE_BYTES = 4096


class FrameStore(Protocol):
    def alloc_table(self, level: int) -> int:
        """A zeroed 4 KiB table for ``level``; returns its physical address."""

    def free_tables(self, tables: Iterable[int]) -> None:
        """Give the tables back to memory."""

    def read(self, phys: int) -> memoryview:
        """The table at ``phys`` as 512 u64 words (must not be written)."""

    def write(self, phys: int) -> memoryview:
        """The table at ``phys`` as 512 writable u64 words."""

    def prefetch(self, tables: Iterable[int]) -> None:
        """A hint: these tables are read next (a store may fetch them in one go)."""


class DictFrames:
    """Frames in a dict: a FrameStore with no database, allocating from ``base``."""

    def __init__(self, base: int = 0x100000) -> None:
        self.frames: dict[int, bytearray] = {}
        self.levels: dict[int, int] = {}
        self._next = base
        self._free: list[int] = []

    def alloc_table(self, level: int) -> int:
        phys = self._free.pop() if self._free else self._next
        if phys == self._next:
            self._next += TABLE_BYTES
        self.frames[phys] = bytearray(TABLE_BYTES)
        self.levels[phys] = level
        return phys

    def free_tables(self, tables: Iterable[int]) -> None:
        for phys in tables:
            del self.frames[phys]
            del self.levels[phys]
            self._free.append(phys)

    def read(self, phys: int) -> memoryview:
        return memoryview(self.frames[phys]).cast("Q").toreadonly()

    def write(self, phys: int) -> memoryview:
        return memoryview(self.frames[phys]).cast("Q")

    def prefetch(self, tables: Iterable[int]) -> None:
        pass
