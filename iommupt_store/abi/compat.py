"""Pre-flight: what a kernel of one profile makes of a handover written under another.

Modelled after the real kernels: a KHO root whose compatible the next kernel
does not read disables KHO revival (it boots as if cold, everything freed); a
LUO header it does not read, or an IOMMU descriptor version it neither reads
nor converts, is a panic (modelled as a refusal to start the next boot).
``compat`` judges a pair of profiles; ``judge`` judges the ABI actually
written (which ``liveupdate --next`` and the boot start use).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from .profiles import KernelProfile, accepted_kho, accepted_luo, read_path

#: object kinds of a handover as the report names them, with the descriptor kind behind each
IOMMU_KINDS = (("domains", "domain"), ("devices", "device"))


class KindVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    #: 'kho', 'luo', 'domains' or 'devices'
    kind: str
    #: the ABI written (compatible string, or catalogue versions)
    written: str
    #: what the next kernel reads
    reads: str
    readable: bool
    #: 'read', 'converted', 'cold boot', 'panic', 'dropped' (by a cold boot) or 'nothing preserved'
    outcome: str
    why: str
    #: how many objects of the kind are preserved (None: a pair of profiles, nothing counted)
    objects: int | None = None


class CompatReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    from_profile: str
    to_profile: str
    readable: bool
    #: 'restored', 'converted', 'cold boot' or 'panic'
    outcome: str
    kinds: list[KindVerdict]

    @property
    def problem(self) -> str:
        """The first reason the handover cannot be read (empty when it can)."""
        bad = [k for k in self.kinds if k.outcome in ("cold boot", "panic")]
        return f"{bad[0].kind}: {bad[0].why}" if bad else ""


@dataclass
class WrittenAbi:
    """What a handover is written in: the KHO and LUO compatibles and, per descriptor kind, the
    catalogue versions of its live entries with their counts (None: not counted)."""

    writer: str
    kho: str
    luo: str
    versions: dict[str, dict[int, int | None]] = field(default_factory=dict)
    counted: bool = False


def written_by(p: KernelProfile) -> WrittenAbi:
    return WrittenAbi(p.name, p.kho, p.luo, {kind: {p.writes: None} for _, kind in IOMMU_KINDS})


def compat(frm: KernelProfile, to: KernelProfile) -> CompatReport:
    """Whether a handover written under ``frm`` can be read under ``to``, per object kind."""
    return judge(written_by(frm), to)


def judge(w: WrittenAbi, to: KernelProfile) -> CompatReport:
    kinds: list[KindVerdict] = []
    kho_ok = w.kho in accepted_kho(to)
    reads_kho = ", ".join(sorted(accepted_kho(to)))
    kinds.append(
        KindVerdict(
            kind="kho",
            written=w.kho,
            reads=reads_kho,
            readable=kho_ok,
            outcome="read" if kho_ok else "cold boot",
            why=f"{to.name} reads KHO {reads_kho}"
            if kho_ok
            else f"KHO root {w.kho!r} is not one {to.name} reads ({reads_kho}): KHO revival is disabled, "
            "the next kernel boots as if cold and everything preserved is freed",
        )
    )
    luo_ok = w.luo in accepted_luo(to)
    reads_luo = ", ".join(sorted(accepted_luo(to)))
    if not kho_ok:
        kinds.append(_dropped("luo", w.luo, reads_luo, None))
    else:
        kinds.append(
            KindVerdict(
                kind="luo",
                written=w.luo,
                reads=reads_luo,
                readable=luo_ok,
                outcome="read" if luo_ok else "panic",
                why=f"{to.name} reads LUO {reads_luo}"
                if luo_ok
                else f"LUO {w.luo!r} is not one {to.name} reads ({reads_luo}): the kernel panics at boot",
            )
        )
    for label, kind in IOMMU_KINDS:
        versions = w.versions.get(kind, {})
        count = sum(n or 0 for n in versions.values()) if w.counted else None
        native = ", ".join(str(v) for v in to.reads)
        reads = native + (f"; converts {', '.join(str(v) for v in to.converts)}" if to.converts else "")
        written = ", ".join(f"version {v}" for v in sorted(versions)) or "none"
        if not kho_ok:
            kinds.append(_dropped(label, written, reads, count))
            continue
        if not versions:
            kinds.append(
                KindVerdict(
                    kind=label,
                    written="none",
                    reads=reads,
                    readable=True,
                    outcome="nothing preserved",
                    why=f"no {kind} is preserved",
                    objects=0,
                )
            )
            continue
        verdicts = []
        for v in sorted(versions):
            path = read_path(to, kind, v)
            if path is None:
                verdicts.append(
                    (
                        "panic",
                        f"{kind} descriptor version {v} is one {to.name} neither reads ({native}) "
                        "nor converts: the kernel panics at boot",
                    )
                )
            elif len(path) > 1:
                chain = "->".join(str(x) for x in path)
                verdicts.append(("converted", f"version {v} is converted on restore ({chain})"))
            else:
                verdicts.append(("read", f"{to.name} reads version {v} natively"))
        outcome = next((o for o in ("panic", "converted", "read") if any(x == o for x, _ in verdicts)), "read")
        kinds.append(
            KindVerdict(
                kind=label,
                written=written,
                reads=reads,
                readable=luo_ok and outcome != "panic",
                outcome=outcome if luo_ok else "panic",
                why="; ".join(why for _, why in verdicts)
                if luo_ok
                else f"not reached: the kernel panics on LUO first ({'; '.join(why for _, why in verdicts)})",
                objects=count,
            )
        )
    outcomes = {k.outcome for k in kinds}
    overall = (
        "cold boot"
        if not kho_ok
        else "panic"
        if "panic" in outcomes
        else "converted"
        if "converted" in outcomes
        else "restored"
    )
    return CompatReport(
        from_profile=w.writer,
        to_profile=to.name,
        readable=overall in ("restored", "converted"),
        outcome=overall,
        kinds=kinds,
    )


def _dropped(kind: str, written: str, reads: str, count: int | None) -> KindVerdict:
    return KindVerdict(
        kind=kind,
        written=written,
        reads=reads,
        readable=False,
        outcome="dropped",
        why="not read: the KHO mismatch boots the next kernel as if cold",
        objects=count,
    )
