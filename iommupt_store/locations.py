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


#: the kernel profile a process attaches with (``--kernel``), and the file of user profiles (``--profiles``)
ENV_KERNEL = "IOMMUPT_KERNEL"
ENV_PROFILES = "IOMMUPT_PROFILES"
#: the newest shipped profile: what a boot runs when nothing names one
DEFAULT_PROFILE = "lu-v5"
