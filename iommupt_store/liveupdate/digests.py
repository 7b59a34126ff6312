"""What a boot records about its handover: SHA-256 digests over canonical JSON.

Pure functions (no database): the preserving code, restore, ``fsck`` and the
Alembic revision that added the digests all compute them the same way.

- An entry's digest covers every field of a handover entry that the next boot
  acts on: the boot that wrote it, token, kind, compatible, the descriptor,
  and the domain, device and session it names.
- Its frames digest covers (pfn, order, content hash) of every frame preserved
  for its domain (empty for a device entry).
- A boot's seal digest covers all of its entries (token and both digests), its
  sessions (id and name) and every preservation record it wrote.

Fields added after the digests were introduced (an entry's catalogue version
and flags, the boot's kernel profile, the KHO/LUO handover records) are covered
whenever their value differs from the one every row had before them (version
1, flags 0, profile lu-v3, no records): handovers sealed earlier keep their
digests, and any edit of a new field still changes what is hashed.

They detect edits of stored rows after the fact. They are not signatures:
whoever can write the database can recompute them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

#: bump when what the digests cover changes (stored digests then need a migration)
DIGEST_FORMAT = 1
#: the kernel profile of every boot stored before profiles existed
LEGACY_PROFILE = "lu-v3"


def owner_tag(domain_id: int) -> str:
    """The ``preserved_by`` of a domain's frames: what ties them to the domain's handover entry."""
    return f"iommupt:domain/{domain_id}"


def _sha256(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def entry_digest(
    *,
    machine_id: int,
    boot_id: int,
    boot_number: int,
    token: int,
    kind: str,
    compatible: str,
    descriptor: Any,
    domain_id: int | None,
    device_id: int | None,
    session_id: int | None,
    session_name: str | None,
    abi_version: int = 1,
    flags: int = 0,
) -> str:
    return _sha256(
        {
            **({"abi_version": abi_version} if abi_version != 1 else {}),
            **({"flags": flags} if flags != 0 else {}),
            "format": DIGEST_FORMAT,
            "machine_id": machine_id,
            "boot_id": boot_id,
            "boot": boot_number,
            "token": token,
            "kind": kind,
            "compatible": compatible,
            "descriptor": descriptor,
            "domain_id": domain_id,
            "device_id": device_id,
            "session_id": session_id,
            "session": session_name,
        }
    )


def frames_digest(frames: Iterable[tuple[int, int, str]]) -> str:
    """Over (pfn, order, content hash) of a domain's preserved frames, in pfn order."""
    return _sha256({"format": DIGEST_FORMAT, "frames": sorted([list(f) for f in frames])})


def seal_digest(
    *,
    boot_id: int,
    boot_number: int,
    entries: Iterable[tuple[int, str | None, str | None]],
    sessions: Iterable[tuple[int, str]],
    preservations: Iterable[tuple[int, int, str, str]],
    profile: str = LEGACY_PROFILE,
    records: Any = None,
) -> str:
    """Over a boot's whole handover: entries as (token, digest, frames digest), sessions as (id, name),
    preservation records as (pfn, order, preserved_by, content hash), the kernel profile and the
    KHO/LUO records (JSON) when there are any."""
    return _sha256(
        {
            **({"profile": profile} if profile != LEGACY_PROFILE else {}),
            **({"records": records} if records is not None else {}),
            "format": DIGEST_FORMAT,
            "boot_id": boot_id,
            "boot": boot_number,
            "entries": sorted([list(e) for e in entries]),
            "sessions": sorted([list(s) for s in sessions]),
            "preservations": sorted([list(p) for p in preservations]),
        }
    )
