"""``iommupt-store shell``: Python with the store open for reading and the API at hand.

For the questions SQL does not answer. The namespace holds ``machine`` (an
observer of the latest boot: nothing attaches, nothing is written), ``tx``
(one read-only transaction kept open for the whole shell) and the inspection
API, so that ``hardware_walker(tx, 1).translate(0x1234)`` works as typed.
"""

from __future__ import annotations

import code
from typing import Any

from .errors import InvalidArgument
from .machine import Machine

BANNER = """iommupt-store shell: machine {name!r}, boot {boot}{ended}, opened read-only.
  tx                             a read-only transaction (nothing you do here is written)
  list_domains(tx)               domains of the observed boot
  get_domain(tx, ID).info()      one domain; .walker() for its hardware walker
  hardware_walker(tx, ID)        .translate(IOVA), .leaves(), .tables()
  stored_runs(tx, ID)            the domain's mapping runs (the 'mapping' view)
  verify_domain(tx, ID[, runs])  every translation checked (runs: ExpectedRun(iova=, phys=, length=))
  fsck(tx)                       the model's invariants
  sql('SELECT ...')              a read-only query, as 'iommupt-store query' runs it
"""


def namespace(machine: Machine, tx: Any) -> dict[str, Any]:
    from . import devices, mappings
    from .domains import frame_counts, get_domain, hardware_walker, list_domains
    from .formats import get_format
    from .formats.describe import describe_entry
    from .fsck import fsck
    from .query import run_query
    from .verify import ExpectedRun, verify_domain

    def sql(statement: str) -> list[tuple[Any, ...]]:
        return run_query(machine, statement).rows

    return {
        "machine": machine,
        "store": machine.store,
        "tx": tx,
        "list_domains": list_domains,
        "get_domain": get_domain,
        "hardware_walker": hardware_walker,
        "frame_counts": frame_counts,
        "stored_runs": mappings.stored_runs,
        "mappings": mappings,
        "devices": devices,
        "fsck": fsck,
        "verify_domain": verify_domain,
        "ExpectedRun": ExpectedRun,
        "get_format": get_format,
        "describe_entry": describe_entry,
        "sql": sql,
    }


def run_shell(machine: Machine, command: str | None = None) -> None:
    """An interactive console, or run ``command`` (Python source) and return."""
    with machine.transaction(write=False) as tx:
        ns = namespace(machine, tx)
        if command is not None:
            try:
                exec(compile(command, "<shell -c>", "exec"), ns)
            except Exception as e:  # the user's code failed: say how, in one line
                raise InvalidArgument(f"shell -c: {type(e).__name__}: {e}") from None
            return
        ended = f" (ended: {machine.boot_end_kind})" if machine.boot_end_kind else ""
        code.interact(
            banner=BANNER.format(name=machine.name, boot=machine.boot_number, ended=ended),
            local=ns,
            exitmsg="",
        )
