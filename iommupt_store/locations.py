"""Which store and machine a caller means when it names none: the defaults and their variables.

Kept apart (and free of imports) so that the command line can show its help
without loading the database layer.
"""

from __future__ import annotations

import os

DEFAULT_DB = "iommupt.db"
ENV_DB = "IOMMUPT_DB"
DEFAULT_MACHINE = "default"
ENV_MACHINE = "IOMMUPT_MACHINE"


def default_location() -> str:
    """``$IOMMUPT_DB`` if set, else ``./iommupt.db``."""
    return os.environ.get(ENV_DB) or DEFAULT_DB


def sqlite_file_url(path: str) -> str:
    """The SQLAlchemy URL of the SQLite file at ``path`` (a bare path: no ``://``)."""
    from pathlib import Path

    return f"sqlite:///{Path(path).expanduser().absolute()}"


#: the kernel profile a process attaches with (``--kernel``), and the file of user profiles (``--profiles``)
ENV_KERNEL = "IOMMUPT_KERNEL"
ENV_PROFILES = "IOMMUPT_PROFILES"
#: the newest shipped profile: what a boot runs when nothing names one
DEFAULT_PROFILE = "lu-v5"
