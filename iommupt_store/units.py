"""Numbers as a kernel engineer types them: ``0x1000``, ``4096``, ``4K``, ``4KB``, ``4KiB``, ``2M``, ``1G``.

One parser for every size, address and token, shared by the command line and
the pytest plugin. Suffixes are binary (K = 1024, as the kernel's SZ_4K); a
hexadecimal number takes no suffix (``0x1B`` is 27, not 1 byte).
"""

from __future__ import annotations

import re

from .errors import InvalidArgument
from .formats.base import Prot

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
U64_MAX = (1 << 64) - 1
#: the largest value an SQL BIGINT column holds (ids are stored there)
I64_MAX = (1 << 63) - 1
#: the machine's page: memory is allocated and counted in these
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

_DECIMAL = re.compile(r"(?P<digits>[0-9]+)\s*(?P<unit>[kmgtpe]?)(?:i?b)?", re.IGNORECASE)
_HEX = re.compile(r"0x(?P<digits>[0-9a-f]+)", re.IGNORECASE)
_HINT = "use 0x..., decimal, or a size such as 4K, 2M, 1G, 4GB, 4GiB"


def parse_number(text: str, *, maximum: int = U64_MAX) -> int:
    """``text`` as a non-negative integer no larger than ``maximum``; InvalidArgument otherwise."""
    t = text.strip().replace("_", "")
    if t.startswith("-") or t.startswith("+-"):
        raise InvalidArgument(f"{text!r} is negative: only numbers from 0 to {maximum:#x} are accepted")
    t = t.removeprefix("+")
    if m := _HEX.fullmatch(t):
        value = int(m["digits"], 16)
    elif m := _DECIMAL.fullmatch(t):
        value = int(m["digits"]) * UNITS[m["unit"].lower()]
    else:
        raise InvalidArgument(f"{text!r} is not a number ({_HINT})")
    if value > maximum:
        raise InvalidArgument(f"{text!r} is too large: the largest accepted value is {maximum:#x}")
    return value


def format_size(n: int) -> str:
    """``2M``, ``1G``, ``4K`` when ``n`` is a whole number of such units, else hex."""
    for unit, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n:#x}"


#: mapping permissions as letters (``map --prot rw``, ``"prot": "rw"`` in an expectation file)
PROT_LETTERS = {
    "r": Prot.READ,
    "w": Prot.WRITE,
    "c": Prot.CACHE,
    "x": 0,  # executable is the default; the letter only says so
    "n": Prot.NOEXEC,
    "m": Prot.MMIO,
    "p": Prot.PRIV,
}


def parse_prot(text: str) -> int:
    """Permission letters (``rw``, ``rn`` ...) as ``Prot`` bits; InvalidArgument naming unknown letters."""
    unknown = sorted({ch for ch in text if ch not in PROT_LETTERS})
    if unknown or not text:
        shown = ", ".join(repr(ch) for ch in unknown) or "none"
        raise InvalidArgument(f"unknown permission letter(s) {shown} in {text!r}: use r, w, c, x, n, m, p")
    prot = 0
    for ch in text:
        prot |= PROT_LETTERS[ch]
    return prot
