"""``status``: the machines of the store, quickly.

A local SQLite file at the package's head is read through ``sqlite3`` without
importing SQLAlchemy (``db/status_fast.py``); anything else opens the store as
every command does, with SQLAlchemy Core. Neither loads the ORM models,
Alembic or (but for ``--json``) pydantic.
"""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from ..db import status_fast
from ..locations import default_location
from . import render
from .common import Command, Context, emit_json, json_option, pass_ctx


def _status(ctx: Context, explicit_machine: bool) -> tuple[dict[str, Any], str]:
    """The store's status as plain data (``status_sql.read_status``), and its URL as shown."""
    data = status_fast.read(ctx.db if ctx.db is not None else default_location())
    if data is not None and (not explicit_machine or any(m["name"] == ctx.machine_name for m in data["machines"])):
        return data, data["url"]  # a plain path: SQLAlchemy would show it unchanged
    from ..db.engine import shown_url, translate_db_errors

    store = ctx.store()
    data = store.status_data()
    if explicit_machine:
        with translate_db_errors(store.url), store.engine.connect() as conn:
            store.machine_id(conn, ctx.machine_name)  # NotFound, naming the machines there
    return data, shown_url(store.url)


@click.command(cls=Command)
@json_option
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    """Machines, their boots and the memory they use.

    All machines, or only the one named by an explicit --machine (or
    $IOMMUPT_MACHINE), which must exist.

    \b
    Example:
      iommupt-store status --json | jq '.machines[].pages_allocated'
    """
    root = click.get_current_context().find_root()
    explicit = root.get_parameter_source("machine") not in (None, ParameterSource.DEFAULT)
    data, shown = _status(ctx, explicit)
    if explicit:
        data["machines"] = [m for m in data["machines"] if m["name"] == ctx.machine_name]
    if as_json:
        from ..reports import StoreStatus

        emit_json(StoreStatus.model_validate(data))
        return
    rows = []
    for m in data["machines"]:
        cur = m["boots"][-1] if m["boots"] else None
        state = (
            "running" if cur and cur["end_kind"] is None else f"ended ({cur['end_kind']})" if cur else "never booted"
        )
        rows.append(
            (
                m["name"],
                f"{m['mem_bytes'] >> 20} MiB",
                cur["number"] if cur else "-",
                state,
                f"{m['pages_allocated']} ({m['bytes_allocated'] >> 10} KiB)",
                len(m["boots"]),
            )
        )
    render.table(
        ("machine", "memory", "boot", "state", "pages used", "boots so far"),
        rows,
        title=f"{shown} (schema {data['revision']})",
    )
