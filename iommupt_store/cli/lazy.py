"""Commands imported when they are used, so that ``--help`` and ``--version`` start fast.

A command's module (and what it needs: SQLAlchemy, pydantic, rich) is
imported only when that command runs or shows its help. The root's ``--help``
lists every command with the short help kept in the table, importing none.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, MutableMapping

import click


class LazyEntry:
    """Where a command lives and the one line the root's help shows for it."""

    def __init__(self, module: str, attribute: str, short_help: str) -> None:
        self.module = module
        self.attribute = attribute
        self.short_help = short_help

    def load(self) -> click.Command:
        cmd = getattr(importlib.import_module(self.module), self.attribute)
        assert isinstance(cmd, click.Command), f"{self.module}.{self.attribute} is not a click command"
        return cmd


class LazyCommands(MutableMapping[str, click.Command]):
    """A group's ``commands``: names known up front, each command imported on first access."""

    def __init__(self, entries: Mapping[str, LazyEntry]) -> None:
        self.entries = dict(entries)
        self.loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self.loaded:
            self.loaded[name] = self.entries[name].load()
        return self.loaded[name]

    def __setitem__(self, name: str, cmd: click.Command) -> None:
        self.loaded[name] = cmd

    def __delitem__(self, name: str) -> None:
        self.entries.pop(name, None)
        del self.loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter({**self.entries, **self.loaded})

    def __len__(self) -> int:
        return len(self.entries.keys() | self.loaded.keys())

    def short_help(self, name: str, limit: int) -> str:
        """The command's one line for a listing, without importing it when it is not loaded yet."""
        if name in self.loaded:
            return self.loaded[name].get_short_help_str(limit)
        # shortened as click shortens a command's own help
        return click.Command(name, help=self.entries[name].short_help).get_short_help_str(limit)


def format_lazy_commands(group: click.Group, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """``Group.format_commands`` for a group whose ``commands`` are a ``LazyCommands``."""
    commands = group.commands
    assert isinstance(commands, LazyCommands)
    names = group.list_commands(ctx)
    if not names:
        return
    limit = formatter.width - 6 - max(len(n) for n in names)
    with formatter.section("Commands"):
        formatter.write_dl([(n, commands.short_help(n, limit)) for n in names])
