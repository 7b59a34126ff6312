"""Backup copies of an SQLite store, taken before its schema changes.

``VACUUM INTO`` writes a consistent, compacted copy from one read transaction,
so a writer in another process neither blocks it for long nor tears it. The
copy is created empty first (0600, ``O_EXCL``): an existing file is never
overwritten, and the copy is as private as the store.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from ..errors import StoreUnavailable
from .engine import BUSY_TIMEOUT_MS

#: what to do instead on a server database: one line for the user
POSTGRES_NOTE = "no backup taken of a PostgreSQL database: take one first with pg_dump if you may need it"


def backup_name(path: Path, revision: str | None, when: datetime | None = None) -> Path:
    """``<name>.bak-<revision>-<UTC time>`` next to ``path`` (a suffix ``-N`` if that exists already)."""
    stamp = (when or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    base = path.with_name(f"{path.name}.bak-{revision or 'base'}-{stamp}")
    target, n = base, 1
    while target.exists():
        target, n = base.with_name(f"{base.name}-{n}"), n + 1
    return target


def backup_sqlite(path: Path, revision: str | None) -> Path:
    """A consistent copy of the SQLite file ``path`` (at ``revision``) beside it; its path."""
    target = backup_name(path, revision)
    try:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as e:
        raise StoreUnavailable(f"cannot create backup {target}: {e.strerror}", e.errno or errno.EIO) from None
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("VACUUM INTO ?", (str(target),))  # must run outside a transaction
    except sqlite3.Error as e:
        target.unlink(missing_ok=True)
        raise StoreUnavailable(f"cannot write backup {target}: {e}", errno.EIO) from None
    finally:
        conn.close()
    return target
