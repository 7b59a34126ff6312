"""Live update: KHO-style preservation, the IOMMU domain callbacks, LUO sessions, boots.

Every function takes the ``Transaction`` of the current boot first (except
``liveupdate``, which takes the ``Machine`` and is a transaction of its own),
and each call that changes state is all or nothing.

Boot N, before the seal:

- ``create_session(tx, name)``: a new LUO session (a name of 1..63 bytes, unique in the boot).
- ``preserve_domain_in_session(tx, name, domain_id, token)``: preserve a domain's tables and hand its
  descriptor over under ``token`` in the session; ``preserve_domain(tx, domain_id, token)`` does the
  same outside any session.
- ``preserve_device(tx, name, bdf, token)``: keep a device's attachment (its domain and domain id)
  across the live update; its domain must be preserved in the same session.
- ``close_session(tx, name)`` / ``unpreserve_domain(tx, token)``: the exact inverse, before the seal.
- ``liveupdate(machine)``: check everything preserved, seal the handover and end the boot (the kexec).

Boot N+1, in the next process:

- ``retrieve_session(tx, name)``: take the session over, once; its objects can then be restored.
- ``restore_domain(tx, token) -> Domain``: the preserved domain, immutable (it can only be freed); its
  preserved devices are re-attached to it with their domain ids.
- ``finish_session(tx, name) -> FinishReport``: complete the session once no device still translates
  through the old tables (``Busy`` otherwise); reports what was never reclaimed.
- ``handover_report(tx)``, ``incoming_entries(tx)``, ``list_sessions(tx)``: what was handed over.

Devices themselves (``attach``, ``detach``, ``replace``, ``dma_walker``, ``list_devices``) are in
``iommupt_store.devices``; pages preserved by hand (``preserve_pages``, ``restore_pages``) are KHO's.
"""

from __future__ import annotations

from .boots import SealRefused, check_preserved, handover_report, liveupdate
from .iommu import incoming_entries, preserve_domain, restore_domain, unpreserve_domain
from .kho import preserve_pages, restore_pages, unpreserve_pages
from .sessions import (
    close_session,
    create_session,
    finish_session,
    list_sessions,
    preserve_device,
    preserve_domain_in_session,
    retrieve_session,
)

__all__ = [
    "SealRefused",
    "check_preserved",
    "close_session",
    "create_session",
    "finish_session",
    "handover_report",
    "incoming_entries",
    "list_sessions",
    "liveupdate",
    "preserve_device",
    "preserve_domain",
    "preserve_domain_in_session",
    "preserve_pages",
    "restore_domain",
    "restore_pages",
    "retrieve_session",
    "unpreserve_domain",
    "unpreserve_pages",
]
