"""Live update: KHO-style preservation, the seed's domain callbacks, boots."""

from __future__ import annotations

from .boots import SealRefused, check_preserved, handover_report, liveupdate
from .iommu import incoming_entries, preserve_domain, restore_domain, unpreserve_domain
from .kho import preserve_pages, restore_pages, unpreserve_pages

__all__ = [
    "SealRefused",
    "check_preserved",
    "handover_report",
    "incoming_entries",
    "liveupdate",
    "preserve_domain",
    "preserve_pages",
    "restore_domain",
    "restore_pages",
    "unpreserve_domain",
    "unpreserve_pages",
]
