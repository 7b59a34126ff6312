"""Shared CLI plumbing: the context object, output helpers, error mapping."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import click
from pydantic import BaseModel
from rich.console import Console

from ..errors import IommuptError
from ..machine import Machine
from ..store import DEFAULT_MACHINE, Store


@dataclass
class Context:
    """What the top-level options decide; commands open the store lazily."""

    db: str | None
    machine_name: str = DEFAULT_MACHINE
    _store: Store | None = field(default=None, repr=False)

    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.db)
        return self._store

    def machine(self) -> Machine:
        return self.store().machine(self.machine_name)


pass_ctx = click.make_pass_decorator(Context)


class Group(click.Group):
    """A group whose commands report our errors as one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IommuptError as e:
            fail(e)


#: human output goes to stderr so that stdout carries only ``--json`` documents
err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


def emit_json(data: Any) -> None:
    if isinstance(data, BaseModel):
        click.echo(data.model_dump_json(indent=2))
    else:
        click.echo(json.dumps(data, indent=2, default=str))


def fail(err: IommuptError) -> None:
    err_console.print(f"[bold red]error:[/] {err}", markup=True, soft_wrap=True)
    sys.exit(err.exit_code)


def parse_int(text: str, what: str) -> int:
    """Integers as a kernel engineer types them: 0x..., decimal, with K/M/G/T suffixes."""
    t = text.strip().replace("_", "")
    mult = 1
    suffixes = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
    if t[-3:].lower() in ("kib", "mib", "gib", "tib", "pib"):
        mult, t = suffixes[t[-3].lower()], t[:-3]
    elif t and t[-1].lower() in suffixes and not t.lower().startswith("0x"):
        mult, t = suffixes[t[-1].lower()], t[:-1]
    try:
        return int(t, 0) * mult
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a number (use 0x..., decimal or 4K/2M/1G)", param_hint=what
        ) from None


class IntParam(click.ParamType):  # type: ignore[type-arg]
    """A click type for addresses and sizes (hex, decimal, K/M/G suffixes)."""

    name = "int"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        return parse_int(str(value), param.human_readable_name if param else "value")


INT = IntParam()
