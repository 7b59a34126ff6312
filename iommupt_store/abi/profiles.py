"""Kernel profiles: which ABI a boot's kernel writes and reads.

A profile fixes the compatible strings of the KHO root, LUO, memfd and the
IOMMU FLB, the catalogue version of the IOMMU descriptors it writes, the
versions it reads natively and the older ones it converts on restore (through
registered converters). ``lu-v3`` and ``lu-v5`` model two real kernels; users
add their own in a TOML or JSON file (``--profiles`` / ``$IOMMUPT_PROFILES``)::

    plugins = ["mypkg.abi:register"]   # optional: zero-argument callables that register versions
                                       # (importable, or a module next to this file)

    [profiles.lu-v5-reads-v1]
    base = "lu-v5"          # inherit every field not given
    converts = [1]          # read version-1 descriptors through the 1->2 converter

A profile that converts version N also accepts the KHO and LUO compatibles of
the shipped kernels that write N (the "previous version" support proposed
upstream covers the whole handover, not one FLB); ``kho_reads`` and
``luo_reads`` add others.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tomllib
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidArgument, IommuptError
from ..locations import DEFAULT_PROFILE, ENV_KERNEL, ENV_PROFILES
from . import catalogue

ENTRY_POINT_GROUP = "iommupt_store.abi"

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")]
Compatible = Annotated[str, Field(min_length=1, max_length=47, pattern=r"^[\x21-\x7e]+$")]
Version = Annotated[int, Field(ge=1, le=1000)]


class KernelProfile(BaseModel):
    """One kernel's live-update ABI."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: Name
    description: Annotated[str, Field(max_length=200)] = ""
    #: what the kernel writes as kexec-metadata's previous_release (``uname -r``)
    release: Annotated[str, Field(min_length=1, max_length=64)]
    kho: Compatible
    luo: Compatible
    memfd: Compatible
    #: the compatible of the IOMMU FLB
    iommu: Compatible
    #: the catalogue version of the IOMMU descriptors it writes
    writes: Version
    #: the catalogue versions it reads natively
    reads: list[Version]
    #: older versions it reads through registered converters
    converts: list[Version] = []
    #: KHO and LUO compatibles accepted besides its own
    kho_reads: list[Compatible] = []
    luo_reads: list[Compatible] = []
    #: the seal writes the KHO root record with kexec-metadata and the LUO header (kho-v4 added
    #: kexec-metadata; the seed's kho-v2 kernels wrote neither, and their handovers are stored as then)
    kexec_metadata: bool = True


class ProfileEntry(BaseModel):
    """A profile in a profile file: every field optional when ``base`` names a profile to inherit."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    base: Name | None = None
    description: Annotated[str, Field(max_length=200)] | None = None
    release: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    kho: Compatible | None = None
    luo: Compatible | None = None
    memfd: Compatible | None = None
    iommu: Compatible | None = None
    writes: Version | None = None
    reads: list[Version] | None = None
    converts: list[Version] | None = None
    kho_reads: list[Compatible] | None = None
    luo_reads: list[Compatible] | None = None
    kexec_metadata: bool | None = None


class ProfileFile(BaseModel):
    """A profile file (TOML or JSON): plug-ins to load, then named profiles."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    plugins: list[Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]] = []
    profiles: dict[Name, ProfileEntry] = {}


SHIPPED: dict[str, KernelProfile] = {
    p.name: p
    for p in (
        KernelProfile(
            name="lu-v3",
            description="June 2026: the IOMMU live-update series v3 on KHO/LUO of its time",
            release="7.1.0",
            kho="kho-v2",
            luo="luo-v3",
            memfd="memfd-v1",
            iommu="iommu-liveupdate-v1",
            writes=1,
            reads=[1],
            kexec_metadata=False,
        ),
        KernelProfile(
            name="lu-v5",
            description="Sept 2026: the series v5 on Linux 7.3 (kho-v4, luo-v5)",
            release="7.3.4",
            kho="kho-v4",
            luo="luo-v5",
            memfd="memfd-v2",
            iommu="iommu-liveupdate",
            writes=2,
            reads=[2],
        ),
    )
}
DEFAULT = DEFAULT_PROFILE
#: profiles of loaded files, by name, with the file each came from
_USER: dict[str, tuple[KernelProfile, str]] = {}
_LOADED: set[str] = set()
_PLUGINS_LOADED: set[str] = set()


def _one_line(err: ValidationError, where: str) -> str:
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(root)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: field {loc}: {e['msg']}{more}"


def run_plugin(spec: str, where: str, beside: Path | None = None) -> None:
    """Call ``module:function`` (a zero-argument callable that registers versions and converters).

    ``beside`` (a profile file's directory) is searched after every other place on the import path, as
    a script's own directory is: a module kept next to its profile file is found without
    ``PYTHONPATH``, and cannot hide an installed module of the same name."""
    if spec in _PLUGINS_LOADED:
        return
    module_name, _, attr = spec.partition(":")
    if beside is not None and str(beside) not in sys.path:
        sys.path.append(str(beside))
    try:
        fn: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
        fn()
    except IommuptError as e:
        raise InvalidArgument(f"{where}: plug-in {spec}: {e.args[0] if e.args else e}") from None
    except Exception as e:  # a plug-in is code we do not control: any failure is one line
        raise InvalidArgument(f"{where}: plug-in {spec} failed: {type(e).__name__}: {e}") from None
    _PLUGINS_LOADED.add(spec)


def load_entry_point_plugins() -> None:
    """Run every plug-in installed under the ``iommupt_store.abi`` entry-point group (once)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        run_plugin(ep.value, f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP}")


def _read(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"profile file {path}: cannot read it: {e.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(data)
        return tomllib.loads(data.decode())
    except (ValueError, UnicodeDecodeError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise InvalidArgument(f"profile file {path}: not valid {kind}: {e}") from None


def check_profile(p: KernelProfile, where: str) -> None:
    """Every version a profile names must be in the catalogue; every converted one must reach one it reads."""
    for kind in catalogue.KINDS:
        if p.writes not in catalogue.versions(kind):
            raise InvalidArgument(f"{where}: field writes: {kind} descriptor version {p.writes} is not registered")
        if p.writes not in (1, 2) and catalogue.conversion_path(kind, 2, {p.writes}) is None:
            raise InvalidArgument(f"{where}: field writes: no registered {kind} converter leads from 2 to {p.writes}")
    for v in p.reads:
        for kind in catalogue.KINDS:
            if v not in catalogue.versions(kind):
                raise InvalidArgument(f"{where}: field reads: {kind} descriptor version {v} is not registered")
    for v in p.converts:
        for kind in catalogue.KINDS:
            if catalogue.conversion_path(kind, v, set(p.reads)) is None:
                raise InvalidArgument(
                    f"{where}: field converts: no registered {kind} converter leads from version {v} "
                    f"to one of {p.reads}"
                )


def load_profile_file(path: str | os.PathLike[str]) -> list[KernelProfile]:
    """Read a profile file, run its plug-ins and add its profiles; returns them."""
    path = Path(path)
    key = str(path.resolve())
    where = f"profile file {path}"
    try:
        spec = ProfileFile.model_validate(_read(path))
    except ValidationError as e:
        raise InvalidArgument(_one_line(e, where)) from None
    load_entry_point_plugins()
    for plugin in spec.plugins:
        run_plugin(plugin, where, beside=path.resolve().parent)
    out = []
    for name, entry in spec.profiles.items():
        here = f"{where}: profile {name!r}"
        if name in SHIPPED:
            raise InvalidArgument(f"{here}: a shipped profile cannot be redefined (use base = {name!r})")
        fields = entry.model_dump(exclude_none=True)
        base_name = fields.pop("base", None)
        if base_name is not None:
            base = SHIPPED.get(base_name) or (_USER[base_name][0] if base_name in _USER else None)
            if base is None:
                raise InvalidArgument(f"{here}: field base: no profile named {base_name!r}")
            fields = {**base.model_dump(), **fields}
        try:
            profile = KernelProfile.model_validate({**fields, "name": name})
        except ValidationError as e:
            raise InvalidArgument(_one_line(e, here)) from None
        check_profile(profile, here)
        _USER[name] = (profile, str(path))
        out.append(profile)
    _LOADED.add(key)
    return out


def _load_env_file() -> None:
    path = os.environ.get(ENV_PROFILES)
    if path and str(Path(path).resolve()) not in _LOADED:
        load_profile_file(path)


def all_profiles() -> list[tuple[KernelProfile, str]]:
    """Every profile (shipped first), with where it comes from ('shipped' or the file)."""
    _load_env_file()
    return [(p, "shipped") for p in SHIPPED.values()] + sorted(_USER.values(), key=lambda t: t[0].name)


def get_profile(name: str) -> KernelProfile:
    _load_env_file()
    if name in SHIPPED:
        return SHIPPED[name]
    if name in _USER:
        return _USER[name][0]
    known = ", ".join(p.name for p, _ in all_profiles())
    hint = "" if _USER else f" (user profiles come from --profiles FILE or ${ENV_PROFILES})"
    raise InvalidArgument(f"unknown kernel profile {name!r}: known are {known}{hint}")


#: the profile this process chose for every attach (the command line's --kernel)
_PROCESS_KERNEL: list[str | None] = [None]


def choose_process_kernel(name: str | None) -> None:
    """Make ``name`` the profile every attach of this process asks for when it names none."""
    _PROCESS_KERNEL[0] = name


def requested_profile(kernel: str | None) -> str | None:
    """The profile a process asked for: the argument, else the process's choice (``--kernel``), else
    ``$IOMMUPT_KERNEL``; None when none of them."""
    name = kernel if kernel is not None else _PROCESS_KERNEL[0] or os.environ.get(ENV_KERNEL) or None
    if name is not None:
        get_profile(name)  # an unknown name is refused before anything is opened
    return name


def accepted_kho(p: KernelProfile) -> set[str]:
    return {p.kho, *p.kho_reads, *(s.kho for s in SHIPPED.values() if s.writes in p.converts)}


def accepted_luo(p: KernelProfile) -> set[str]:
    return {p.luo, *p.luo_reads, *(s.luo for s in SHIPPED.values() if s.writes in p.converts)}


def read_path(p: KernelProfile, kind: str, version: int) -> list[int] | None:
    """How profile ``p`` reads a ``kind`` descriptor of ``version``: [version] natively, a converter
    chain for a converted version, None when it cannot."""
    if version in p.reads:
        return [version]
    if version in p.converts:
        return catalogue.conversion_path(kind, version, set(p.reads))
    return None


def profile_file_schema() -> dict[str, Any]:
    schema = ProfileFile.model_json_schema()
    schema["$comment"] = "iommupt-store kernel profile file (TOML or JSON)"
    return schema
