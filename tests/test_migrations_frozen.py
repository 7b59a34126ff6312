"""Revisions keep doing what they did: they never import the live package.

A revision's transforms are frozen copies inside the revision file. These tests
fail when a revision imports ``iommupt_store`` (scanned with ``ast``, imports
inside functions included), and they compare each frozen copy with the live
code for the schema of its revision, so that a divergence is noticed. If the
live code later changes on purpose, the test for that revision documents that
the revision keeps the old form (compare with the old expected values then,
never edit the revision).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import text

from iommupt_store.db import migrate
from iommupt_store.domains import domain_alloc, get_domain
from iommupt_store.errors import IommuptError
from iommupt_store.formats.base import Prot
from iommupt_store.liveupdate import digests
from iommupt_store.machine import Machine
from iommupt_store.mappings import stored_runs

VERSIONS = migrate.package_versions_dir()
REVISIONS = sorted(VERSIONS.glob("*.py"))


def load(stem_prefix: str) -> ModuleType:
    path = next(p for p in REVISIONS if p.name.startswith(stem_prefix))
    spec = importlib.util.spec_from_file_location(f"revision_{stem_prefix}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imported_modules(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return found


def test_there_are_revisions_to_scan() -> None:
    assert len(REVISIONS) >= 6


@pytest.mark.parametrize("path", REVISIONS, ids=lambda p: p.stem)
def test_no_revision_imports_the_live_package(path: Path) -> None:
    live = sorted(m for m in imported_modules(path.read_text()) if m.split(".")[0] == "iommupt_store")
    assert live == [], f"{path.name} imports {live}: copy what it needs into the revision (frozen)"


def test_the_scan_finds_every_kind_of_import() -> None:
    source = "import iommupt_store\ndef f():\n    from iommupt_store.x import y\n    __import__('iommupt_store.z')\n"
    assert imported_modules(source) == {"iommupt_store", "iommupt_store.x", "iommupt_store.z"}


# -- 0005: the handover digests (digest format 1) ------------------------------------------------
def test_0005_frozen_digests_agree_with_the_live_ones() -> None:
    r = load("0005")
    assert digests.DIGEST_FORMAT == 1, "the live digests moved on: revision 0005 keeps format 1"
    rng = random.Random(5)
    for _ in range(50):
        fields = {
            "machine_id": rng.randrange(1, 9),
            "boot_id": rng.randrange(1, 99),
            "boot_number": rng.randrange(1, 99),
            "token": rng.randrange(1 << 64),
            "kind": rng.choice(["domain", "device"]),
            "compatible": rng.choice(["iommu-liveupdate-v1", "x"]),
            "descriptor": {"format": "x86_64", "top": rng.randrange(1 << 40), "features": ["SIGN_EXTEND"]},
            "domain_id": rng.choice([None, rng.randrange(1, 50)]),
            "device_id": rng.choice([None, rng.randrange(1, 50)]),
            "session_id": rng.choice([None, 3]),
            "session_name": rng.choice([None, "vm-1"]),
        }
        assert r.entry_digest(**fields) == digests.entry_digest(**fields)
        frames = [(rng.randrange(1 << 30), rng.randrange(3), f"{rng.randrange(1 << 64):016x}") for _ in range(5)]
        assert r.frames_digest(frames) == digests.frames_digest(frames)
        entries = [(rng.randrange(1 << 64), "a" * 64, "b" * 64) for _ in range(3)]
        kept = [(p, o, "iommupt:domain/1", h) for p, o, h in frames]
        seal = {"boot_id": 4, "boot_number": 2, "entries": entries, "sessions": [(1, "s")], "preservations": kept}
        assert r.seal_digest(**seal) == digests.seal_digest(**seal)
    assert r.owner_tag(7) == digests.owner_tag(7)


# -- 0006: the mapping ledger, walked from the frames ------------------------------------------------
FORMATS = ["x86_64", "amdv1", "vtdss", "riscv"]


def _churn(machine: Machine, domain_id: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        iova = rng.choice([0, 0x20_0000, 0x4000_0000, 0x7FFF_FFE0_0000]) + rng.randrange(64) * 0x1000
        if rng.random() < 0.2:
            iova |= 0xFFFF_8000_0000_0000
        with machine.transaction() as tx:
            dom = get_domain(tx, domain_id)
            try:
                if rng.random() < 0.7:
                    paddr = rng.randrange(0x10_0000, 1 << 32) & ~0xFFF
                    length = rng.choice([0x1000, 0x1_0000, 0x20_0000, 0x1000 * rng.randrange(1, 700)])
                    dom.map_range(iova, paddr, length, rng.choice([Prot.READ, Prot.WRITE, Prot.READ | Prot.WRITE]))
                else:
                    dom.unmap_range(iova, rng.choice([0x1000, 0x20_0000]))
            except IommuptError:
                pass


@pytest.mark.parametrize("fmt", FORMATS)
def test_0006_frozen_walk_agrees_with_the_live_ledger(machine: Machine, fmt: str) -> None:
    r = load("0006")
    with machine.transaction() as tx:
        domain_id = domain_alloc(tx, fmt).id
    _churn(machine, domain_id, seed=len(fmt))
    with machine.transaction(write=False) as tx:
        live = stored_runs(tx, domain_id)
        row = tx.conn.execute(
            text("SELECT format, top_phys, top_level, max_vasz_lg2, features FROM domain WHERE id = :d"),
            {"d": domain_id},
        ).one()
        frames = {
            int(pfn) << 12: bytes(c)
            for pfn, c in tx.conn.execute(text("SELECT pfn, contents FROM page WHERE domain_id = :d"), {"d": domain_id})
        }
    feats = row.features if isinstance(row.features, list) else json.loads(row.features)
    frozen = r.frozen_runs(row.format, frames, row.top_phys, row.top_level, row.max_vasz_lg2, frozenset(feats))
    assert live, "the churn mapped nothing"
    assert [tuple(f) for f in frozen] == [
        (x.iova, x.phys, x.size, x.page_size, x.readable, x.writable, x.flags) for x in live
    ]


def test_0006_frozen_walk_refuses_what_the_old_walk_refused() -> None:
    r = load("0006")
    with pytest.raises(ValueError):
        r.frozen_runs("x86_64", {0: bytes(4096)}, 0, 3, 48, frozenset({"NO_SUCH_FEATURE"}))
    with pytest.raises(LookupError):
        r.frozen_runs("x86_64", {}, 0x1000, 3, 48, frozenset())
