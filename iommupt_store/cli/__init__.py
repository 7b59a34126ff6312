"""The ``iommupt-store`` command line: a thin layer over the library.

Every command calls one library function. Its result (a table, a tree, a
value, or one JSON document with ``--json``) goes to stdout; progress and
diagnostics go to stderr (see ``render``); a failure is one line on stderr and
an exit code (see ``guard``).
"""

from __future__ import annotations

from typing import Any, NoReturn

import click

from ..abi.profiles import DEFAULT as DEFAULT_PROFILE
from ..abi.profiles import ENV_KERNEL, ENV_PROFILES, choose_process_kernel, get_profile, load_profile_file
from ..errors import EXIT_DATAERR, EXIT_FAILURE, EXIT_SOFTWARE, EXIT_TEMPFAIL, EXIT_USAGE, IommuptError
from ..store import DEFAULT_MACHINE, ENV_DB
from . import guard, render
from .abi_cmds import COMMANDS as ABI_COMMANDS
from .common import Context, Group
from .db_cmds import db, fsck, init, status
from .domain_cmds import COMMANDS as DOMAIN_COMMANDS
from .inspect_cmds import COMMANDS as INSPECT_COMMANDS
from .liveupdate_cmds import COMMANDS as LIVEUPDATE_COMMANDS
from .session_cmds import COMMANDS as SESSION_COMMANDS
from .verify_cmd import COMMANDS as VERIFY_COMMANDS

EPILOG = f"""\b
Start with 'iommupt-store demo': a whole live update across two processes.

\b
Exit codes:
  0   success
  {EXIT_FAILURE}   the operation failed (the kernel's errno is named in the message)
  {EXIT_USAGE}   usage error (bad option or argument)
  {EXIT_DATAERR}  bad data: invalid descriptor, tampered frame, foreign or outdated database
  {EXIT_SOFTWARE}  internal error: a bug in iommupt-store (please report it)
  {EXIT_TEMPFAIL}  the database stayed locked by another process (try again)

\b
Commands that only look (status, domains, show, translate, verify,
handover, sessions, devices, device translate, fsck, query, export-image, shell,
schema, profiles, compat) never attach to the machine: they do not start the next boot after a live
update and write nothing. The others attach to the current boot.

\b
The database is ./iommupt.db unless --db or ${ENV_DB} names another one;
a bare path is an SQLite file, anything with :// is an SQLAlchemy URL
(e.g. postgresql+psycopg://user@host/db).
"""


class RootGroup(Group):
    """The top-level group: every run ends through ``guard.run``, in the shell and under CliRunner alike."""

    def main(self, args: Any = None, prog_name: str | None = None, *a: Any, **kw: Any) -> NoReturn:
        kw["standalone_mode"] = False
        guard.run(lambda: super(RootGroup, self).main(args, prog_name, *a, **kw))


@click.group(
    "iommupt-store",
    cls=RootGroup,
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
@click.option(
    "--kernel",
    metavar="PROFILE",
    help=f"Kernel profile of a boot this process starts (default ${ENV_KERNEL}, else {DEFAULT_PROFILE}); "
    "a running boot keeps its own. See 'iommupt-store profiles'.",
)
@click.option(
    "--profiles",
    "profiles_file",
    metavar="FILE",
    help=f"TOML or JSON file of user kernel profiles (default ${ENV_PROFILES}).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or spinners on stderr (shown on a terminal only).")
@click.version_option(package_name="iommupt-store")
@click.pass_context
def cli(
    ctx: click.Context, db: str | None, machine: str, kernel: str | None, profiles_file: str | None, quiet: bool
) -> None:
    """iommupt-store: IOMMU page tables and their live-update preservation, in a database.

    A machine's memory, its IOMMU page-table frames (real PTE bytes) and the
    records of what a boot hands over to the next are rows you can inspect
    with plain SQL. Each invocation is one process attached to the machine's
    current boot.
    """
    render.set_quiet(quiet)
    choose_process_kernel(None)
    if profiles_file is not None:
        load_profile_file(profiles_file)
    if kernel is not None:
        try:
            get_profile(kernel)
        except IommuptError as e:
            raise click.BadParameter(str(e).split(": ", 1)[-1], ctx, param_hint="'--kernel'") from None
    choose_process_kernel(kernel)  # also for commands that attach through the store directly (init)
    ctx.obj = Context(db=db, machine_name=machine, kernel=kernel)


cli.add_command(init)
cli.add_command(status)
cli.add_command(db)
cli.add_command(fsck)
for _cmd in (
    DOMAIN_COMMANDS + LIVEUPDATE_COMMANDS + SESSION_COMMANDS + INSPECT_COMMANDS + VERIFY_COMMANDS + ABI_COMMANDS
):
    cli.add_command(_cmd)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="iommupt-store")
