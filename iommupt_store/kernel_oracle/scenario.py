"""Scenarios: the VFIO calls a run makes, as JSON files.

A scenario is either a list of calls or a seeded random one that expands to calls::

    {"name": "basic", "description": "...", "calls": [
        {"op": "map", "iova": "0x100000", "size": "64K", "buffer": "4k"},
        {"op": "map", "iova": "0x100000", "size": "4K", "buffer": "4k", "expect": "EEXIST"},
        {"op": "unmap", "iova": "0x100000", "size": "64K"}]}
    {"name": "random-7", "description": "...", "random": {"seed": 7, "calls": 40}}

Numbers are integers or strings: hex (``0x...``) or a size with K, M, G or T. ``buffer`` is ``4k``
(anonymous memory, faulted in as scattered 4 KiB pages) or ``2m`` (hugetlb 2 MiB pages). ``expect``
is ``ok`` (the default) or the errno name the kernel must fail the call with.
"""

from __future__ import annotations

import errno
import json
import random
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..errors import BadData, NotFound
from .vfio import Dma, DmaList

_UNITS = {"K": 10, "M": 20, "G": 30, "T": 40}
#: what the generator assumes VFIO offers: below the MSI window, and from 4G up to 2^48
#: minus the AMD HyperTransport hole (both vendors reserve 0xfee00000-0xfeefffff)
_SAFE_RANGES = [(0, 0xFDFFFFFF), (1 << 32, 0xFCFFFFFFFF), (1 << 40, (1 << 48) - 1)]


def parse_number(value: Any) -> int:
    """An integer from an int or a string such as ``0x1000``, ``4096``, ``64K``, ``2M``."""
    if isinstance(value, bool):
        raise ValueError("a number, not a boolean")
    if isinstance(value, int):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a number or a string such as '0x1000' or '2M', not {value!r}")
    text = value.strip().upper()
    shift = _UNITS.get(text[-1], 0)
    digits = text[:-1] if shift else text
    try:
        n = int(digits, 0)
    except ValueError:
        raise ValueError(f"not a number: {value!r}") from None
    return n << shift


Number = Annotated[int, BeforeValidator(parse_number), Field(ge=0, lt=1 << 64)]


def errno_value(name: str) -> int:
    return 0 if name == "ok" else int(getattr(errno, name))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MapCall(_Model):
    op: Literal["map"]
    iova: Number
    size: Number
    buffer: Literal["4k", "2m"] = "4k"
    expect: str = "ok"

    @model_validator(mode="after")
    def _known_expect(self) -> MapCall:
        _check_expect(self.expect)
        if self.size == 0 or self.size > 1 << 30:
            raise ValueError("a map's size must be 1 byte to 1 GiB (the guest has 512 MiB)")
        return self


class UnmapCall(_Model):
    op: Literal["unmap"]
    iova: Number
    size: Number
    expect: str = "ok"

    @model_validator(mode="after")
    def _known_expect(self) -> UnmapCall:
        _check_expect(self.expect)
        return self


def _check_expect(name: str) -> None:
    if name != "ok" and not (name.startswith("E") and isinstance(getattr(errno, name, None), int)):
        raise ValueError(f"expect must be 'ok' or an errno name such as 'EEXIST', not {name!r}")


Call = Annotated[MapCall | UnmapCall, Field(discriminator="op")]


class RandomSpec(_Model):
    seed: int
    calls: int = Field(ge=1, le=400)


class Scenario(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    calls: list[Call] = Field(default_factory=list)
    random: RandomSpec | None = None

    @model_validator(mode="after")
    def _calls_or_random(self) -> Scenario:
        if bool(self.calls) == (self.random is not None):
            raise ValueError("a scenario has either 'calls' or 'random', not both or neither")
        if self.random is not None:
            object.__setattr__(self, "calls", generate_calls(self.random.seed, self.random.calls))
        return self


def shipped_dir() -> Path:
    return Path(str(resources.files(__package__) / "scenarios"))


def shipped_scenarios() -> list[Path]:
    return sorted(shipped_dir().glob("*.json"))


def load_scenario(spec: str) -> Scenario:
    """A scenario from a file path or the name of a shipped one; BadData names what is wrong."""
    path = Path(spec)
    if not path.exists():
        shipped = shipped_dir() / f"{spec}.json"
        if not shipped.exists():
            names = ", ".join(p.stem for p in shipped_scenarios())
            raise NotFound(f"no scenario file {spec!r} and no shipped scenario of that name (shipped: {names})")
        path = shipped
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BadData(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise BadData(f"{path}: not JSON: {e}") from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "scenario"
        raise BadData(f"{path}: {where}: {err['msg']}") from None


def plan_text(scenarios: list[Scenario]) -> str:
    """The guest program's plan for a batch of scenarios."""
    lines: list[str] = []
    for s in scenarios:
        lines.append(f"scenario {s.name}")
        for c in s.calls:
            if isinstance(c, MapCall):
                lines.append(f"map {c.iova:x} {c.size:x} {c.buffer}")
            else:
                lines.append(f"unmap {c.iova:x} {c.size:x}")
        lines.append("end")
    return "\n".join(lines) + "\n"


# -- seeded random scenarios ---------------------------------------------------------------------
def generate_calls(seed: int, count: int) -> list[MapCall | UnmapCall]:
    """``count`` calls mixing scattered 4K and 2M hugetlb buffers over the 48-bit space, overlapping
    maps that must fail, and whole, multi-mapping, splitting and empty unmaps. The same seed always
    gives the same calls; expected results come from the VFIO model."""
    rng = random.Random(seed)
    dmas = DmaList(min_page=4096, iova_ranges=_SAFE_RANGES)
    hugepages_left = 56  # the guest reserves 64; keep some slack
    calls: list[MapCall | UnmapCall] = []
    while len(calls) < count:
        roll = rng.random()
        if dmas.dmas and roll < 0.12:
            d = rng.choice(dmas.dmas)  # overlaps an existing mapping
            iova = d.iova + rng.randrange(0, d.size, 4096)
            calls.append(MapCall(op="map", iova=iova, size=4096 * rng.randint(1, 16), expect="EEXIST"))
        elif dmas.dmas and roll < 0.35:
            calls.append(_random_unmap(rng, dmas))
        else:
            call = _random_map(rng, dmas, hugepages_left)
            if call is None:
                continue
            if call.buffer == "2m":
                hugepages_left -= -(-call.size // (2 << 20))
            dmas.add(Dma(call.iova, call.size))
            calls.append(call)
    return calls


def _random_map(rng: random.Random, dmas: DmaList, hugepages_left: int) -> MapCall | None:
    lo, hi = rng.choice(_SAFE_RANGES)
    huge = hugepages_left >= 4 and rng.random() < 0.4
    if huge:
        size = (2 << 20) * rng.randint(1, 3)
        align = rng.choice([2 << 20, 2 << 20, 1 << 30, 4096])  # sometimes an IOVA a 2M page cannot use
    else:
        size = 4096 * rng.choice([1, 1, 3, 16, 64, 200, 512, 600])
        align = rng.choice([4096, 2 << 20])
    span = (hi - lo + 1 - size) // align
    if span <= 0:
        return None
    # cluster around a few bases so tables are shared, but spread over the whole space too
    if rng.random() < 0.5:
        base = rng.choice([lo, lo + (1 << 30), (lo + hi) // 2 & ~((1 << 30) - 1)])
        iova = base + rng.randrange(0, 64 << 20, align)
    else:
        iova = lo + rng.randrange(span) * align
    if iova + size - 1 > hi or dmas.check_map(iova, size):
        return None
    return MapCall(op="map", iova=iova, size=size, buffer="2m" if huge else "4k")


def _random_unmap(rng: random.Random, dmas: DmaList) -> UnmapCall:
    i = rng.randrange(len(dmas.dmas))
    d = dmas.dmas[i]
    kind = rng.random()
    if kind < 0.15 and d.size > 4096:
        # would split a mapping: VFIO type1 v2 refuses
        return UnmapCall(op="unmap", iova=d.iova + 4096, size=d.size - 4096, expect="EINVAL")
    if kind < 0.35:
        # from this mapping through the next one or two, holes included
        last = dmas.dmas[min(len(dmas.dmas) - 1, i + rng.randint(1, 2))]
        iova, size = d.iova, last.last - d.iova + 1
    elif kind < 0.45:
        iova, size = d.last + 1, 4096  # right after it: a hole or the next mapping's start
        err, hit = dmas.check_unmap(iova, size)
        if err or hit:
            iova, size = d.iova, d.size
    else:
        iova, size = d.iova, d.size
    err, hit = dmas.check_unmap(iova, size)
    dmas.remove(hit)
    return UnmapCall(op="unmap", iova=iova, size=size, expect=errno.errorcode[err] if err else "ok")
