"""``export-image``: a machine's memory as a sparse raw image, for memory-forensics tools.

Every allocated block is written at its physical address (``pfn * 4096``) in a
file as long as the machine's memory; the holes stay sparse. A JSON sidecar
(``IMAGE.json``) says, per domain, what a walker needs: format, top table
address, levels, VA size, sign extension and features.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Connection, func, select

from .db.models import Boot, Page
from .db.models import Domain as DomainRow
from .domains import stored_geometry
from .errors import InvalidArgument
from .formats.base import Feature
from .machine import Machine
from .memory import PAGE_SHIFT

SIDECAR_VERSION = 1
_BATCH = 256


class ImageDomain(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    format: str
    state: str
    #: physical address of the top table, in the image
    top_phys: int
    #: levels a walk goes through (top_level + 1)
    levels: int
    top_level: int
    #: VA bits the top decodes
    vasz: int
    sign_extend: bool
    features: list[str]


class ImageSidecar(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int = SIDECAR_VERSION
    machine: str
    boot: int
    page_size: int = 1 << PAGE_SHIFT
    #: the image's length: the machine's memory
    mem_bytes: int
    pages_written: int
    bytes_written: int
    created_at: dt.datetime
    domains: list[ImageDomain]


Progress = Callable[[int, int], None]


def sidecar_path(image: Path) -> Path:
    return image.with_name(image.name + ".json")


def export_image(machine: Machine, image: Path, *, progress: Progress | None = None) -> ImageSidecar:
    """Write the image and its sidecar; returns the sidecar. ``progress(done, total)`` is
    called as pages are written. The files are written next to their final names and
    renamed at the end, so a failure leaves no half-written image behind."""
    image = Path(image)
    if image.is_dir():
        raise InvalidArgument(f"{image} is a directory: name the image file to write")
    if not image.parent.is_dir():
        raise InvalidArgument(f"directory {image.parent} does not exist")
    tmp = image.with_name(f".{image.name}.part")
    side = sidecar_path(image)
    side_tmp = side.with_name(f".{side.name}.part")
    try:
        with machine.transaction(write=False) as tx:
            mid = tx.machine.id
            total = tx.conn.execute(select(func.count()).select_from(Page).where(Page.machine_id == mid)).scalar_one()
            domains = _domains(machine, tx.conn)
            boot = tx.conn.execute(select(Boot.number).where(Boot.id == tx.machine.boot_id)).scalar() or 0
            written = nbytes = 0
            with open(tmp, "wb") as out:
                out.truncate(machine.mem_bytes)
                last = None
                while True:
                    q = select(Page.pfn, Page.contents).where(Page.machine_id == mid).order_by(Page.pfn).limit(_BATCH)
                    if last is not None:
                        q = q.where(Page.pfn > last)
                    rows = tx.conn.execute(q).all()
                    if not rows:
                        break
                    for pfn, contents in rows:
                        data = bytes(contents)
                        out.seek(int(pfn) << PAGE_SHIFT)
                        out.write(data)
                        nbytes += len(data)
                    written += len(rows)
                    last = rows[-1][0]
                    if progress:
                        progress(written, total)
        sidecar = ImageSidecar(
            machine=machine.name,
            boot=boot,
            mem_bytes=machine.mem_bytes,
            pages_written=written,
            bytes_written=nbytes,
            created_at=dt.datetime.now(dt.UTC),
            domains=domains,
        )
        side_tmp.write_text(sidecar.model_dump_json(indent=2) + "\n")
        os.replace(tmp, image)
        os.replace(side_tmp, side)
        return sidecar
    except OSError as e:
        raise InvalidArgument(f"cannot write {image}: {e.strerror or e}") from None
    finally:
        for leftover in (tmp, side_tmp):
            leftover.unlink(missing_ok=True)


def _domains(machine: Machine, conn: Connection) -> list[ImageDomain]:
    rows = conn.execute(
        select(DomainRow.__table__)
        .where(DomainRow.machine_id == machine.id, DomainRow.state != "freed")
        .order_by(DomainRow.id)
    ).mappings()
    out = []
    for r in rows:
        fmt, feats, vasz = stored_geometry(r)  # a hand-edited row is bad data naming it
        out.append(
            ImageDomain(
                id=r["id"],
                format=r["format"],
                state=r["state"],
                top_phys=r["top_phys"],
                levels=r["top_level"] + 1,
                top_level=r["top_level"],
                vasz=vasz,
                sign_extend=fmt.effective(Feature.SIGN_EXTEND, feats),
                features=sorted(f.value for f in feats),
            )
        )
    return out
