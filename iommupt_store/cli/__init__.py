"""The ``iommupt-store`` command line: a thin layer over the library.

Every command calls one library function. Its result (a table, a tree, a
value, or one JSON document with ``--json``) goes to stdout; progress and
diagnostics go to stderr (see ``render``); a failure is one line on stderr and
an exit code (see ``guard``).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from .. import __version__
from ..errors import EXIT_DATAERR, EXIT_FAILURE, EXIT_SOFTWARE, EXIT_TEMPFAIL, EXIT_USAGE
from ..locations import DEFAULT_MACHINE, DEFAULT_PROFILE, ENV_DB, ENV_KERNEL, ENV_MACHINE, ENV_PROFILES
from . import guard
from .common import Context, Group
from .lazy import LazyCommands, LazyEntry, format_lazy_commands

#: every command: name -> (module in this package, attribute, the line the root's --help shows).
#: A command is imported only when it runs or shows its own help; a test keeps this table equal to
#: the modules' ``COMMANDS`` and the lines equal to the commands' own short help.
COMMAND_TABLE: dict[str, tuple[str, str, str]] = {
    "compat": (
        "abi_cmds",
        "compat_cmd",
        "Can a handover written under kernel profile FROM be read under TO?",
    ),
    "db": (
        "db_cmds",
        "db",
        "Schema revisions (Alembic): upgrade, downgrade, stamp, current, heads, history, revision.",
    ),
    "demo": ("liveupdate_cmds", "demo", "Run a whole live update across two real processes and check it."),
    "device": (
        "session_cmds",
        "device",
        "PCI devices: attach to a domain, preserve across a live update, replace after it.",
    ),
    "devices": ("session_cmds", "devices", "Devices of the machine and their attachments."),
    "domain": ("domain_cmds", "domain", "Create and free IOMMU domains (page tables)."),
    "domains": ("domain_cmds", "domains", "Domains of the machine, with state, geometry and frame count."),
    "export-image": (
        "inspect_cmds",
        "export_image",
        "Write the machine's memory as a sparse raw image IMAGE, and IMAGE.json.",
    ),
    "fsck": ("db_cmds", "fsck", "Check the machine's stored state against the model's invariants (read-only)."),
    "handover": (
        "liveupdate_cmds",
        "handover",
        "The incoming handover (from the previous boot) and the outgoing one (this boot).",
    ),
    "init": ("db_cmds", "init", "Create the database (or upgrade it) and the machine, if they are new."),
    "liveupdate": ("liveupdate_cmds", "liveupdate_cmd", "Seal this boot's handover and end the boot: the kexec."),
    "map": ("domain_cmds", "map_cmd", "Map LENGTH bytes at IOVA to PADDR, choosing page sizes as the kernel does."),
    "preserve": ("liveupdate_cmds", "preserve", "Preserve DOMAIN_ID's page tables for a live update, under TOKEN."),
    "profiles": (
        "abi_cmds",
        "profiles",
        "List the kernel profiles (shipped and from --profiles / $IOMMUPT_PROFILES) and their ABI.",
    ),
    "query": ("inspect_cmds", "query", "Run one read-only SQL statement and print its rows."),
    "reboot": ("liveupdate_cmds", "reboot", "End this boot without a handover: all memory is freed."),
    "restore": (
        "liveupdate_cmds",
        "restore",
        "Restore a domain the previous boot preserved: it comes back immutable (free only).",
    ),
    "schema": ("abi_cmds", "schema", "Print the JSON Schema of a descriptor version (or of the profile file)."),
    "session": ("session_cmds", "session", "LUO sessions: named containers of preserved domains and devices."),
    "sessions": ("session_cmds", "sessions", "Live-update sessions of the machine, with their state in each boot."),
    "shell": ("inspect_cmds", "shell", "Python with the store open read-only and the API imported."),
    "show": (
        "domain_cmds",
        "show",
        "The table tree of DOMAIN_ID: level, pfn, entries in use, leaf sizes; then leaves per page size.",
    ),
    "status": ("status_cmd", "status", "Machines, their boots and the memory they use."),
    "translate": (
        "domain_cmds",
        "translate",
        "Translate IOVAS as the IOMMU hardware would (reading only the stored frames).",
    ),
    "unmap": ("domain_cmds", "unmap", "Unmap from IOVA; prints the number of bytes unmapped, in hex."),
    "verify": ("verify_cmd", "verify", "Check every translation of DOMAIN_ID, walking its frames as the IOMMU would."),
    "unpreserve": (
        "liveupdate_cmds",
        "unpreserve",
        "Undo a preserve (before the live update): the domain is mutable again.",
    ),
}

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
    """The top-level group: every run ends through ``guard.run``, in the shell and under CliRunner alike.

    Its commands are imported on first use (``COMMAND_TABLE``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(
            {name: LazyEntry(f"{__name__}.{mod}", attr, line) for name, (mod, attr, line) in COMMAND_TABLE.items()}
        )

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_lazy_commands(self, ctx, formatter)

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
    envvar=ENV_MACHINE,
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
@click.version_option(__version__, prog_name="iommupt-store")
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
    # imported here, not at the top: --help and --version never get this far, and start fast
    from . import render

    render.set_quiet(quiet)
    ctx.obj = Context(db=db, machine_name=machine, kernel=kernel)
    if kernel is None and profiles_file is None:
        # nothing to check: the profiles (pydantic) load with the first command that attaches
        loaded = sys.modules.get("iommupt_store.abi.profiles")
        if loaded is not None:
            loaded.choose_process_kernel(None)  # forget an earlier in-process run's --kernel
        return
    from ..abi.profiles import choose_process_kernel, get_profile, load_profile_file
    from ..errors import IommuptError

    choose_process_kernel(None)
    if profiles_file is not None:
        load_profile_file(profiles_file)
    if kernel is not None:
        try:
            get_profile(kernel)
        except IommuptError as e:
            raise click.BadParameter(str(e).split(": ", 1)[-1], ctx, param_hint="'--kernel'") from None
    choose_process_kernel(kernel)  # also for commands that attach through the store directly (init)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="iommupt-store")
