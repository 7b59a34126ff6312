"""ABI commands: ``schema``, ``profiles``, ``compat``; and the rendering of a pre-flight report."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..abi import catalogue
from ..abi.compat import CompatReport, compat
from ..abi.profiles import all_profiles, get_profile, load_entry_point_plugins, profile_file_schema
from ..errors import IommuptError
from . import render
from .common import Command, Number, emit_json, json_option

SCHEMA_KINDS = (*catalogue.KINDS, "profiles")


class ProfileParam(click.ParamType):  # type: ignore[type-arg]
    """A kernel profile name: shipped (lu-v3, lu-v5) or from the profile file."""

    name = "profile"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return get_profile(str(value)).name
        except IommuptError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)


PROFILE = ProfileParam()


def _versions_text(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) or "-"


@click.command(cls=Command)
@click.argument("kind", required=False, type=click.Choice(SCHEMA_KINDS))
@click.argument("version", required=False, type=Number(1000))
@click.option("--list", "list_all", is_flag=True, help="List the schemas there are instead of printing one.")
def schema(kind: str | None, version: int | None, list_all: bool) -> None:
    """Print the JSON Schema of a descriptor version (or of the profile file).

    KIND is domain, device or profiles; VERSION defaults to the newest. The
    committed copies are docs/schema/KIND-vVERSION.json and profiles.json.

    \b
    Examples:
      iommupt-store schema domain 2
      iommupt-store schema device 1
      iommupt-store schema profiles
      iommupt-store schema --list
      iommupt-store --profiles lab.toml schema domain 3   # a version a plug-in adds
    """
    # the versions of plug-ins too: the entry points', and those of --profiles / $IOMMUPT_PROFILES
    load_entry_point_plugins()
    all_profiles()
    if list_all or kind is None:
        for k in catalogue.KINDS:
            for v in catalogue.versions(k):
                render.result(f"{k} {v}")
        render.result("profiles")
        return
    if kind == "profiles":
        out = profile_file_schema()
    else:
        known = catalogue.versions(kind)
        out = catalogue.json_schema(kind, known[-1] if version is None else version)
    click.echo(json.dumps(out, indent=2, sort_keys=True))


@click.command(cls=Command)
@json_option
def profiles(as_json: bool) -> None:
    """List the kernel profiles (shipped and from --profiles / $IOMMUPT_PROFILES) and their ABI.

    \b
    Example:
      iommupt-store profiles
      iommupt-store --profiles my-kernels.toml profiles --json
    """
    rows = all_profiles()
    if as_json:
        emit_json([{**p.model_dump(), "source": src} for p, src in rows])
        return
    render.table(
        ("profile", "source", "release", "KHO", "LUO", "memfd", "IOMMU FLB", "writes", "reads", "converts"),
        (
            (
                p.name,
                src,
                p.release,
                p.kho,
                p.luo,
                p.memfd,
                p.iommu,
                p.writes,
                _versions_text(p.reads),
                _versions_text(p.converts),
            )
            for p, src in rows
        ),
        title="kernel profiles",
    )


def show_report(report: CompatReport) -> None:
    """A pre-flight report as a table and a verdict line."""
    render.table(
        ("object", "written", f"{report.to_profile} reads", "objects", "outcome", "why"),
        ((k.kind, k.written, k.reads, "-" if k.objects is None else k.objects, k.outcome, k.why) for k in report.kinds),
        title=f"{report.from_profile} -> {report.to_profile}",
    )
    verdict = "readable" if report.readable else "NOT readable"
    render.result(f"{report.from_profile} -> {report.to_profile}: {verdict} ({report.outcome})")


@click.command("compat", cls=Command)
@click.argument("from_profile", type=PROFILE)
@click.argument("to_profile", type=PROFILE)
@json_option
def compat_cmd(from_profile: str, to_profile: str, as_json: bool) -> None:
    """Can a handover written under kernel profile FROM be read under TO?

    Per object kind (KHO root, LUO sessions, IOMMU domains, devices): readable
    or not, why, and what the next kernel does: read it, convert it, boot as
    if cold (KHO mismatch) or panic (LUO or IOMMU mismatch). Exit 0 when
    everything is readable, 1 when not. 'liveupdate --next TO' runs the same
    check against what this boot actually preserved.

    \b
    Examples:
      iommupt-store compat lu-v5 lu-v5
      iommupt-store compat lu-v3 lu-v5 --json
    """
    report = compat(get_profile(from_profile), get_profile(to_profile))
    if as_json:
        emit_json(report)
    else:
        show_report(report)
    if not report.readable:
        sys.exit(1)


COMMANDS = [schema, profiles, compat_cmd]
