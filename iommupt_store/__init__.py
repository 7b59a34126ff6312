"""iommupt-store: Linux generic IOMMU page tables and their live-update
preservation, modelled as rows in a database.

``create(path, machine, mem="4G")`` makes a store and a machine and returns the
``Machine``, attached to its boot 1; ``open(path, machine)`` attaches to an
existing one. Work happens in ``machine.transaction()``, with the functions of
``iommupt_store.domains`` (page tables), ``iommupt_store.liveupdate``
(preserve, restore, sessions, the seal) and ``iommupt_store.devices``.

The names below are imported on first use, so that importing a submodule
(for instance the pytest plugin ``iommupt_store.testing``) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import IommuptError
    from .store import Store, create, open

__all__ = ["IommuptError", "Store", "create", "open"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "IommuptError":
        from .errors import IommuptError

        return IommuptError
    if name in ("Store", "create", "open"):
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module 'iommupt_store' has no attribute {name!r}")
