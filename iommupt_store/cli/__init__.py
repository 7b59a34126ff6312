"""The ``iommupt-store`` command line: a thin layer over the library.

Every command calls one library function; ``--json`` prints one JSON document
on stdout, human output and progress go to stderr.
"""

from __future__ import annotations

import sys

import click

from ..errors import EXIT_DATAERR, EXIT_FAILURE, EXIT_TEMPFAIL, EXIT_USAGE, IommuptError
from ..store import DEFAULT_MACHINE, ENV_DB
from .common import Context, Group, fail
from .db_cmds import db, fsck, init, status
from .domain_cmds import COMMANDS as DOMAIN_COMMANDS
from .liveupdate_cmds import COMMANDS as LIVEUPDATE_COMMANDS
from .session_cmds import COMMANDS as SESSION_COMMANDS

EPILOG = f"""\b
Start with 'iommupt-store demo': a whole live update across two processes.

\b
Exit codes:
  0   success
  {EXIT_FAILURE}   the operation failed (the kernel's errno is named in the message)
  {EXIT_USAGE}   usage error (bad option or argument)
  {EXIT_DATAERR}  bad data: invalid descriptor, tampered frame, foreign or outdated database
  {EXIT_TEMPFAIL}  the database stayed locked by another process (try again)

\b
The database is ./iommupt.db unless --db or ${ENV_DB} names another one;
a bare path is an SQLite file, anything with :// is an SQLAlchemy URL
(e.g. postgresql+psycopg://user@host/db).
"""


@click.group(
    cls=Group,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--db",
    envvar=ENV_DB,
    metavar="PATH|URL",
    help=f"Database to use (default ./iommupt.db, or ${ENV_DB}).",
)
@click.option(
    "--machine",
    "-m",
    envvar="IOMMUPT_MACHINE",
    default=DEFAULT_MACHINE,
    show_default=True,
    help="Machine (host) in the database to act on.",
)
@click.version_option(package_name="iommupt-store")
@click.pass_context
def cli(ctx: click.Context, db: str | None, machine: str) -> None:
    """iommupt-store: IOMMU page tables and their live-update preservation, in a database.

    A machine's memory, its IOMMU page-table frames (real PTE bytes) and the
    records of what a boot hands over to the next are rows you can inspect
    with plain SQL. Each invocation is one process attached to the machine's
    current boot.
    """
    ctx.obj = Context(db=db, machine_name=machine)


cli.add_command(init)
cli.add_command(status)
cli.add_command(db)
cli.add_command(fsck)
for _cmd in DOMAIN_COMMANDS + LIVEUPDATE_COMMANDS + SESSION_COMMANDS:
    cli.add_command(_cmd)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="iommupt-store", standalone_mode=True)
    except IommuptError as e:  # raised while click was not looking (e.g. in a callback)
        fail(e)
    sys.exit(0)
