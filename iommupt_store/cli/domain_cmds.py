"""Domain commands: create, map, unmap, translate, show, domains, free."""

from __future__ import annotations

from typing import Any

import click
from rich.tree import Tree

from ..domains import DEFAULTS, domain_alloc, get_domain, list_domains
from ..formats import FORMATS
from ..formats.base import TABLE_ITEMS_LG2, Feature, item_lg2sz
from ..formats.describe import leaf_flags, permissions
from ..pagetable.walker import TableInfo
from ..reports import TranslationInfo
from ..units import format_size as _size
from . import render
from .common import ID, INT, PROT, Command, Context, Group, Number, emit_json, json_option, pass_ctx

#: geometry options (levels, bit widths) are small numbers; the format checks the exact range
SMALL = Number(255)


@click.group(cls=Group)
def domain() -> None:
    """Create and free IOMMU domains (page tables)."""


@domain.command("create")
@click.argument("format", type=click.Choice(sorted(FORMATS)))
@click.option("--top-level", type=SMALL, help="Top level (amdv1: starting level 1..5; x86_64: 3..4; vtdss: 2..4).")
@click.option("--vasz", type=SMALL, help="Hardware VA width in bits (riscv: 39, 48 or 57 selects Sv39/48/57).")
@click.option("--oasz", type=SMALL, help="Hardware output-address width in bits (default: the format's maximum).")
@click.option(
    "--feature",
    "features",
    multiple=True,
    type=click.Choice([f.value for f in Feature], case_sensitive=False),
    help="A feature to request (repeatable); replaces the format's default features.",
)
@json_option
@pass_ctx
def create(
    ctx: Context,
    format: str,
    top_level: int | None,
    vasz: int | None,
    oasz: int | None,
    features: tuple[str, ...],
    as_json: bool,
) -> None:
    """Allocate a domain of FORMAT with an empty top table.

    \b
    Defaults: amdv1 starting level 2 with a dynamic top (up to 64-bit VA);
    x86_64 4-level, 48-bit, sign-extended; vtdss 4-level, 48-bit;
    riscv Sv48, sign-extended.

    \b
    Example:
      iommupt-store domain create x86_64 --json
      iommupt-store domain create riscv --vasz 39 --feature SIGN_EXTEND --feature RISCV_SVNAPOT_64K
    """
    with ctx.machine().transaction() as tx:
        dom = domain_alloc(
            tx,
            format,
            top_level=top_level,
            vasz=vasz,
            oasz=oasz,
            features=[f.upper() for f in features] if features else None,
        )
        info = dom.info()
    if as_json:
        emit_json(info)
    else:
        render.note(
            f"domain {info.id}: {info.format}, top level {info.top_level} at {info.top_phys:#x}, "
            f"{info.range_vasz_lg2}-bit VA, page sizes {info.pgsize_bitmap:#x}"
        )
        render.result(info.id)


@domain.command("free")
@click.argument("domain_id", type=ID)
@json_option
@pass_ctx
def free(ctx: Context, domain_id: int, as_json: bool) -> None:
    """Free every table frame of DOMAIN_ID (the only thing a restored domain allows)."""
    with render.progress(f"freeing domain {domain_id}"), ctx.machine().transaction() as tx:
        n = get_domain(tx, domain_id).free()
    if as_json:
        emit_json({"domain": domain_id, "frames_freed": n})
    else:
        render.result(f"domain {domain_id} freed: {n} table frame(s) released")


@click.command("map", cls=Command)
@click.argument("domain_id", type=ID)
@click.argument("iova", type=INT)
@click.argument("paddr", type=INT)
@click.argument("length", type=INT)
@click.option(
    "--prot",
    type=PROT,
    default="rw",
    show_default=True,
    help="Permissions: r, w, c (cache), x (executable, the default), n (noexec), m (mmio), p (privileged).",
)
@json_option
@pass_ctx
def map_cmd(ctx: Context, domain_id: int, iova: int, paddr: int, length: int, prot: int, as_json: bool) -> None:
    """Map LENGTH bytes at IOVA to PADDR, choosing page sizes as the kernel does.

    \b
    Numbers take 0x..., decimal, or K/M/G/T suffixes.
    Example:
      iommupt-store map 1 0x0 0x100000000 1G          # one 1G page
      iommupt-store map 1 0x40000000 0x80001000 2M    # 512 4K pages (paddr only 4K aligned)
    """
    with render.progress_bar(f"mapping {_size(length)}") as advance, ctx.machine().transaction() as tx:
        dom = get_domain(tx, domain_id)
        dom.map_range(iova, paddr, length, prot, lambda done, total: advance(done >> 12, total >> 12))
        frames = len(dom.pt.collect_tables())
    if as_json:
        emit_json(
            {"domain": domain_id, "iova": f"{iova:#x}", "paddr": f"{paddr:#x}", "length": length, "frames": frames}
        )
    else:
        render.result(f"mapped {_size(length)} at {iova:#x} -> {paddr:#x}; domain {domain_id} has {frames} frame(s)")


@click.command(cls=Command)
@click.argument("domain_id", type=ID)
@click.argument("iova", type=INT)
@click.argument("length", type=INT)
@json_option
@pass_ctx
def unmap(ctx: Context, domain_id: int, iova: int, length: int, as_json: bool) -> None:
    """Unmap from IOVA; prints the number of bytes unmapped, in hex.

    As in the kernel: whole pages only (unmapping the first 4K of a 2M page
    removes all 2M), the walk stops at the first hole, and a table is freed
    only when the range covers its whole span.
    """
    with render.progress(f"unmapping {_size(length)}"), ctx.machine().transaction() as tx:
        n = get_domain(tx, domain_id).unmap_range(iova, length)
    if as_json:
        emit_json({"domain": domain_id, "iova": f"{iova:#x}", "length": length, "unmapped": n})
    else:
        render.result(f"{n:#x}")


@click.command(cls=Command)
@click.argument("domain_id", type=ID)
@click.argument("iovas", type=INT, nargs=-1, required=True)
@click.option(
    "--engine",
    "use_engine",
    is_flag=True,
    help="Ask the engine (iova_to_phys) instead of the hardware walker; refused on restored domains.",
)
@json_option
@pass_ctx
def translate(ctx: Context, domain_id: int, iovas: tuple[int, ...], use_engine: bool, as_json: bool) -> None:
    """Translate IOVAS as the IOMMU hardware would (reading only the stored frames).

    Prints one line per IOVA: the physical address, the page size and the
    leaf level, or the fault and the level at which the walk faulted.
    """
    results: list[TranslationInfo] = []
    with ctx.observer().transaction(write=False) as tx:
        dom = get_domain(tx, domain_id)
        if use_engine:
            for iova in iovas:
                pa = dom.iova_to_phys(iova)
                results.append(
                    TranslationInfo(
                        iova=iova, phys=pa or None, page_size=0, level=0, fault=None if pa else "not present"
                    )
                )
        else:
            walker = dom.walker()
            for iova in iovas:
                t = walker.translate(iova)
                perms = permissions(dom.format, t.entry) if t.phys is not None else (None, None)
                results.append(
                    TranslationInfo(
                        iova=iova,
                        phys=t.phys,
                        page_size=t.page_size,
                        level=t.level,
                        fault=t.fault,
                        readable=perms[0],
                        writable=perms[1],
                        flags=leaf_flags(dom.format, t.entry) if t.phys is not None else None,
                    )
                )
    if as_json:
        emit_json([r.model_dump(mode="json") for r in results])
        return
    for r in results:
        if r.phys is None:
            render.result(f"{r.iova:#x} -> fault: {r.fault} (level {r.level})")
        elif r.page_size:
            access = ("r" if r.readable else "-") + ("w" if r.writable else "-")
            render.result(f"{r.iova:#x} -> {r.phys:#x} ({_size(r.page_size)} page, level {r.level}, {access})")
        else:
            render.result(f"{r.iova:#x} -> {r.phys:#x}")


def _tree_json(t: TableInfo) -> dict[str, object]:
    return {
        "phys": f"{t.phys:#x}",
        "pfn": t.phys >> 12,
        "level": t.level,
        "iova": f"{t.iova:#x}",
        "entries_used": t.used,
        "leaves": {_size(k): v for k, v in sorted(t.leaves.items())},
        "children": [_tree_json(c) for c in t.children],
    }


def _add_rich(node: Tree, t: TableInfo, max_children: int) -> None:
    leaves = ", ".join(f"{v}x{_size(k)}" for k, v in sorted(t.leaves.items()))
    label = f"L{t.level} pfn {t.phys >> 12:#x}  iova {t.iova:#x}  {t.used}/512 used"
    branch = render.branch(node, label + (f"  leaves {leaves}" if leaves else ""))
    shown = t.children[:max_children]
    for c in shown:
        _add_rich(branch, c, max_children)
    rest = t.children[max_children:]
    if rest:
        n_leaves: dict[int, int] = {}
        for c in rest:
            for k, v in c.leaves.items():
                n_leaves[k] = n_leaves.get(k, 0) + v
        sizes = ", ".join(f"{v}x{_size(k)}" for k, v in sorted(n_leaves.items()))
        more = f"… {len(rest)} more level-{rest[0].level} tables"
        render.branch(branch, more + (f" (leaves {sizes})" if sizes else ""))


class IovaRange(click.ParamType):  # type: ignore[type-arg]
    """START or START:END (inclusive), each a 64-bit address."""

    name = "start[:end]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        start_text, _, end_text = str(value).partition(":")
        start = INT.convert(start_text, param, ctx)
        end = INT.convert(end_text, param, ctx) if end_text else start
        if end < start:
            self.fail(f"{value!r}: END is below START", param, ctx)
        return start, end


def _within(t: TableInfo, first: int, last: int, top: bool) -> TableInfo | None:
    """The tree cut to the tables whose span meets [first, last] (the top always stays)."""
    span_last = t.iova + (1 << (item_lg2sz(t.level) + TABLE_ITEMS_LG2)) - 1
    if not top and (span_last < first or t.iova > last):
        return None
    children = [c for c in (_within(c, first, last, False) for c in t.children) if c is not None]
    return TableInfo(t.phys, t.level, t.iova, t.used, dict(t.leaves), children)


@click.command(cls=Command)
@click.argument("domain_id", type=ID)
@click.option(
    "--max-children", type=ID, default=4, show_default=True, help="Child tables shown per table; the rest are summed."
)
@click.option(
    "--iova",
    "iova_range",
    type=IovaRange(),
    help="Only the tables (and leaf totals) that translate START, or START:END inclusive.",
)
@json_option
@pass_ctx
def show(ctx: Context, domain_id: int, max_children: int, iova_range: tuple[int, int] | None, as_json: bool) -> None:
    """The table tree of DOMAIN_ID: level, pfn, entries in use, leaf sizes; then leaves per page size.

    \b
    Examples:
      iommupt-store show 1
      iommupt-store show 1 --iova 0x40000000:0x401fffff --json
    """
    first, last = iova_range if iova_range else (0, (1 << 64) - 1)
    with render.progress(f"walking domain {domain_id}"), ctx.observer().transaction(write=False) as tx:
        dom = get_domain(tx, domain_id)
        info = dom.info()
        tree = None
        totals: dict[int, int] = {}
        if info.top_phys is not None:
            walker = dom.walker()
            tree = _within(walker.tables(), first, last, True)
            for iova, _phys, size, _level, _raw in walker.leaf_entries():
                if iova <= last and iova + size - 1 >= first:
                    totals[size] = totals.get(size, 0) + 1
    leaves = {_size(k): v for k, v in sorted(totals.items())}
    if as_json:
        emit_json(
            {
                "domain": info.model_dump(mode="json"),
                "iova_range": [f"{first:#x}", f"{last:#x}"] if iova_range else None,
                "tree": _tree_json(tree) if tree else None,
                "leaves": leaves,
            }
        )
        return
    title = (
        f"domain {info.id} ({info.format}, {info.state}, boot {info.boot}): {info.frames} frame(s), "
        f"{info.range_vasz_lg2}-bit VA"
    )
    if iova_range:
        title += f", iova {first:#x}..{last:#x}"
    root = render.tree(title)
    if tree is not None:
        _add_rich(root, tree, max_children)
    render.show(root)
    render.result("leaves: " + (", ".join(f"{v} x {k}" for k, v in leaves.items()) or "none"))


@click.command(cls=Command)
@click.option("--all", "include_freed", is_flag=True, help="Include freed domains.")
@json_option
@pass_ctx
def domains(ctx: Context, include_freed: bool, as_json: bool) -> None:
    """Domains of the machine, with state, geometry and frame count."""
    with ctx.observer().transaction(write=False) as tx:
        infos = list_domains(tx, include_freed=include_freed)
    if as_json:
        emit_json([i.model_dump(mode="json") for i in infos])
        return
    render.table(
        ("id", "format", "state", "boot", "top", "level", "VA bits", "frames", "page sizes"),
        (
            (
                i.id,
                i.format,
                i.state,
                i.boot,
                f"{i.top_phys:#x}" if i.top_phys is not None else "-",
                i.top_level,
                i.range_vasz_lg2,
                i.frames,
                f"{i.pgsize_bitmap:#x}",
            )
            for i in infos
        ),
    )


COMMANDS = [domain, map_cmd, unmap, translate, show, domains]
__all__ = ["COMMANDS", "DEFAULTS"]
