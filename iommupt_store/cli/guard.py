"""How a command ends: its exit code and, on failure, exactly one line on stderr.

Our own errors carry their errno and exit code; click's usage errors exit 2.
Anything else is a bug in iommupt-store: it is reported as one "internal
error" line with exit code 70 instead of a traceback, as a last resort
(``IOMMUPT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import click

from ..errors import EXIT_FAILURE, EXIT_SOFTWARE, EXIT_USAGE, IommuptError

#: exit status of a process ended by Ctrl-C, as shells report it
EXIT_INTERRUPTED = 130
INTERNAL_ERROR = "internal error"


def _error(message: IommuptError | str) -> None:
    from . import render  # rich: only when there is something to say

    render.error(message)


def fail(err: IommuptError) -> NoReturn:
    _error(err)
    sys.exit(err.exit_code)


def run(main: Callable[[], Any]) -> NoReturn:
    """Run click's ``main`` (in non-standalone mode) and turn every outcome into an exit code."""
    for stream in (sys.stdout, sys.stderr):
        # a terminal that cannot show a character (say, an ASCII locale) gets an escape, not a crash
        # after the command has committed its work
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")
    try:
        rv = main()
    except IommuptError as e:
        fail(e)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _error(f"usage: {e.format_message()}{hint}")
        sys.exit(EXIT_USAGE)
    except click.ClickException as e:
        _error(e.format_message())
        sys.exit(e.exit_code)
    except click.Abort:
        _error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # the reader went away (e.g. '| head'): stop quietly, and keep Python from complaining at exit
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILURE)
    except Exception as e:  # last resort: a bug, reported in one line
        if os.environ.get("IOMMUPT_DEBUG"):
            traceback.print_exc()
        _error(f"{INTERNAL_ERROR} (a bug in iommupt-store): {type(e).__name__}: {e}")
        sys.exit(EXIT_SOFTWARE)
    sys.exit(rv if isinstance(rv, int) else 0)
