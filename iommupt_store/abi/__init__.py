"""The handover as a versioned ABI: the descriptor catalogue, kernel profiles and compatibility.

- ``catalogue``: one frozen pydantic class per descriptor (kind, version), converters between them.
- ``records``: the KHO/LUO handover records (root, subnodes, kexec-metadata, LUO sessions, files, FLBs).
- ``profiles``: the kernels a boot can run (``lu-v3``, ``lu-v5``, user profiles from a file).
- ``compat``: what a kernel of one profile makes of a handover written under another.

Plug-ins register versions and converters through the entry-point group
``iommupt_store.abi`` or a profile file's ``plugins`` list.
"""

from __future__ import annotations

from .catalogue import register_converter, register_descriptor
from .profiles import KernelProfile, get_profile, load_profile_file

__all__ = ["KernelProfile", "get_profile", "load_profile_file", "register_converter", "register_descriptor"]
