"""Shared CLI plumbing: the context object, the parameter types, the command classes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from ..errors import IommuptError
from ..locations import DEFAULT_MACHINE
from ..units import I64_MAX, U64_MAX, parse_number, parse_prot
from .guard import fail

if TYPE_CHECKING:
    from ..machine import Machine
    from ..store import Store
    from .render import emit_json

__all__ = ["emit_json"]


def __getattr__(name: str) -> Any:
    # the command modules take emit_json from here; rendering (rich, pydantic) loads with the first of them
    if name == "emit_json":
        from .render import emit_json

        return emit_json
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Context:
    """What the top-level options decide; commands open the store lazily."""

    db: str | None
    machine_name: str = DEFAULT_MACHINE
    #: the kernel profile a new boot runs (None: $IOMMUPT_KERNEL, else the newest; a running boot keeps its own)
    kernel: str | None = None
    _store: Store | None = field(default=None, repr=False)

    def store(self) -> Store:
        if self._store is None:
            from ..store import Store

            self._store = Store(self.db)
            # closed when the command ends, also when it runs in-process (a caller's process lives on)
            click.get_current_context().find_root().call_on_close(self._store.close)
        return self._store

    def machine(self) -> Machine:
        """Attach to the current boot (starting boot N+1 after a live update): for commands that change state."""
        return self.store().machine(self.machine_name, self.kernel)

    def observer(self) -> Machine:
        """The machine for reading only: never starts a boot, frees memory or writes a row."""
        return self.store().observe(self.machine_name)


pass_ctx = click.make_pass_decorator(Context)

#: a token that can only be a negative number (click would take "-0x1000" for options -0 -x ...)
_NEGATIVE = re.compile(r"-(?:0x[0-9a-f_]+|[0-9][0-9_]*\s*[kmgtpe]?(?:i?b)?)", re.IGNORECASE)


class Command(click.Command):
    """A command that names a negative number as such instead of as an unknown option."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not ctx.ignore_unknown_options:
            takes_value = {o for p in self.params if isinstance(p, click.Option) and not p.is_flag for o in p.opts}
            previous = None
            for arg in args:
                if arg == "--":
                    break
                if previous not in takes_value and _NEGATIVE.fullmatch(arg):
                    raise click.UsageError(f"{arg}: negative numbers are not accepted (they start at 0)", ctx)
                previous = arg
        return super().parse_args(ctx, args)


class Group(click.Group):
    """A group whose commands report our errors as one line and an exit code."""

    command_class = Command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        for arg in args:
            try:
                arg.encode()
            except UnicodeEncodeError:
                # bytes that are not UTF-8 can be neither stored nor matched against what is stored
                raise click.UsageError(f"{arg!r} is not valid UTF-8 text", ctx) from None
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IommuptError as e:
            fail(e)


Group.group_class = Group

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


class Number(click.ParamType):  # type: ignore[type-arg]
    """Addresses, sizes, tokens and ids: 0x..., decimal, or 4K/2M/1G/4GB/4GiB; never negative, bounded."""

    name = "number"

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_number(str(value), maximum=self.maximum)
        except IommuptError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)


#: a 64-bit address, length or token
INT = Number(U64_MAX)
#: a row id (SQL BIGINT)
ID = Number(I64_MAX)


class ProtParam(click.ParamType):  # type: ignore[type-arg]
    """Mapping permissions as letters: r, w, c (cache), x (executable, the default), n (noexec), m (mmio), p (priv)."""

    name = "prot"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_prot(str(value))
        except IommuptError as e:
            self.fail(str(e), param, ctx)


PROT = ProtParam()
