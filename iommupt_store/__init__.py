"""iommupt-store: Linux generic IOMMU page tables and their live-update
preservation, modelled as rows in a database."""

from __future__ import annotations

from . import liveupdate as _liveupdate  # noqa: F401 - registers the boot-start hook
from .errors import IommuptError
from .store import Store, open

__all__ = ["IommuptError", "Store", "open"]
__version__ = "0.1.0"
