"""Everything the command line prints goes through here.

The rules: a command's result (a table, a tree, a value, a sentence, or JSON
with ``--json``) goes to stdout; progress and diagnostics go to stderr. Text
that came from a user or from the database (machine, session and owner names,
descriptors) is printed literally: rich never interprets it as markup
(``[bold]``), emoji codes (``:bus:``) or something to highlight, and characters
that would drive the terminal (control characters) are shown escaped. So
printing cannot fail, whatever a name holds, and a command that has committed
its work always reports it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.tree import Tree

# rich's progress bars and trees load with the first command that draws one: a table needs neither

#: piped output is never folded: a long name stays on one line for grep and scripts
_PIPE_WIDTH = 10_000


def literal(text: object) -> str:
    """``text`` as it is, except characters that would drive the terminal, shown as escapes."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in s)


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(
        file=stream,
        markup=False,
        emoji=False,
        highlight=False,
        width=None if tty else _PIPE_WIDTH,
        color_system="auto" if tty else None,
    )


def result(text: object) -> None:
    """One line (or several) of a command's result, on stdout."""
    for line in str(text).split("\n"):
        click.echo(literal(line))


def note(text: object) -> None:
    """A diagnostic or progress line, on stderr."""
    for line in str(text).split("\n"):
        click.echo(literal(line), err=True)


def error(text: object) -> None:
    """The one line a failed command leaves on stderr."""
    click.echo("error: " + literal(" ".join(str(text).split("\n"))), err=True)


def emit_json(data: Any) -> None:
    """One JSON document on stdout: plain text, never wrapped or styled."""
    from pydantic import BaseModel  # here: a table or a sentence needs no pydantic

    if isinstance(data, BaseModel):
        click.echo(data.model_dump_json(indent=2))
    else:
        click.echo(json.dumps(data, indent=2, default=str))


def cell(value: object) -> Text:
    """A table cell or tree label: literal text."""
    return Text(literal("-" if value is None else value))


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], *, title: object | None = None) -> None:
    """A table on stdout; every cell is literal text."""
    t = Table(title=cell(title) if title is not None else None)
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*(cell(v) for v in row))
    show(t)


def tree(label: object) -> Tree:
    """The root of a tree to fill with ``branch`` and print with ``show``."""
    from rich.tree import Tree

    return Tree(cell(label))


def branch(node: Tree, label: object) -> Tree:
    return node.add(cell(label))


def show(renderable: RenderableType) -> None:
    """A rich renderable built from ``cell``s (a table or a tree), on stdout."""
    _console(stderr=False).print(renderable)


#: set by the root ``--quiet`` option: no spinners or progress bars at all
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


#: a long step shows progress only after this long, so quick commands stay quiet
PROGRESS_AFTER_S = 1.0


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """A progress bar on stderr while a step of unknown size runs (elapsed time, a pulsing bar)."""
    with progress_bar(message):
        yield


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for a long step: yields ``advance(done, total)`` for the step to report
    with (a step that never reports shows a pulsing bar and the time elapsed).

    Shown only when stderr is a terminal, once the step has run for a second (a timer starts it,
    so a step stuck in one long call shows too), and never with ``--quiet``; it disappears when
    the step ends, leaving stdout to the result.
    """
    console = _console(stderr=True)
    if _quiet or not console.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    lock = threading.Lock()
    state: dict[str, Any] = {"bar": None, "task": None, "done": 0, "total": None, "ended": False}

    def start() -> None:
        with lock:
            if state["ended"]:
                return
            bar = Progress(
                TextColumn(literal(description)),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            bar.start()
            state["task"] = bar.add_task("", total=state["total"], completed=state["done"])
            state["bar"] = bar

    def advance(done: int, total: int) -> None:
        with lock:
            state["done"], state["total"] = done, total
            if state["bar"] is not None:
                state["bar"].update(state["task"], completed=done, total=total)

    timer = threading.Timer(PROGRESS_AFTER_S, start)
    timer.daemon = True
    timer.start()
    try:
        yield advance
    finally:
        timer.cancel()
        with lock:
            state["ended"] = True
            if state["bar"] is not None:
                state["bar"].stop()
