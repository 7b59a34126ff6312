"""iommupt-store: Linux generic IOMMU page tables and their live-update
preservation, modelled as rows in a database.

The names below are imported on first use, so that importing a submodule
(for instance the pytest plugin ``iommupt_store.testing``) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import IommuptError
    from .store import Store, open

__all__ = ["IommuptError", "Store", "open"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "IommuptError":
        from .errors import IommuptError

        return IommuptError
    if name in ("Store", "open"):
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module 'iommupt_store' has no attribute {name!r}")
