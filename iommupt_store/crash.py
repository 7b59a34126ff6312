"""Named crash points for crash tests.

``IOMMUPT_CRASHPOINT=<name>`` makes the process SIGKILL itself when it reaches
that point (``<name>:<n>`` on the n-th time), so a test can check that the
database then holds the state before or after the operation, never a mix.
"""

from __future__ import annotations

import os
import signal

ENV = "IOMMUPT_CRASHPOINT"
_hits: dict[str, int] = {}


def crashpoint(name: str) -> None:
    want = os.environ.get(ENV)
    if not want:
        return
    target, _, nth = want.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)
