"""Revision 0007 (kernel profiles, versioned entries, KHO/LUO records): what it does to stored rows,
what its downgrade drops (``would_lose``), and upgrade -> downgrade -> upgrade with a handover."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa

from iommupt_store.db import migrate
from iommupt_store.db.engine import make_engine
from iommupt_store.domains import domain_alloc, hardware_walker
from iommupt_store.liveupdate import liveupdate, preserve_domain, restore_domain, unpreserve_domain
from iommupt_store.store import Store

from .conftest import sql


def _revision() -> ModuleType:
    path = migrate.migrations_dir() / "versions" / "0007_abi_profiles.py"
    spec = importlib.util.spec_from_file_location("rev_0007", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _would_lose(url: str) -> list[str]:
    engine = make_engine(url, create=False)
    try:
        with engine.connect() as conn:
            return list(_revision().would_lose(conn))
    finally:
        engine.dispose()


def _seal(db: Path, kernel: str, token: int, *, unpreserved: int | None = None) -> None:
    with Store(db) as store:
        m = store.machine("m", kernel=kernel)
        with m.transaction() as tx:
            dom = domain_alloc(tx, "x86_64")
            dom.map_range(0x1000, 0x200000, 0x1000)
            if unpreserved is not None:
                other = domain_alloc(tx, "x86_64")
                preserve_domain(tx, other.id, unpreserved)
                unpreserve_domain(tx, unpreserved)
            preserve_domain(tx, dom.id, token)
        liveupdate(m)


def _restore(db: Path, kernel: str, token: int) -> int:
    with Store(db) as store:
        m = store.machine("m", kernel=kernel)
        with m.transaction() as tx:
            dom = restore_domain(tx, token)
            return hardware_walker(tx, dom.id).translate(0x1000).phys or 0


def test_rows_from_before_are_lu_v3_and_their_handover_restores(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    Store.init(db_path).close()
    with Store(db_path) as s:
        s.create_machine("m", 64 << 20)
    _seal(db_path, "lu-v3", 0x7)  # lu-v3 stores its handover as before the revision
    assert _would_lose(url) == []
    migrate.downgrade(url, "0006")
    assert "kernel_profile" not in {r[1] for r in sql(db_path, "PRAGMA table_info(boot)")}
    migrate.upgrade(url)
    assert sql(db_path, "SELECT kernel_profile, handover_discarded FROM boot") == [("lu-v3", None)]
    assert sql(db_path, "SELECT abi_version, flags FROM handover_entry") == [(1, 0)]
    assert _restore(db_path, "lu-v3", 0x7) == 0x200000


def test_downgrade_names_what_it_drops_then_upgrade_again(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    Store.init(db_path).close()
    with Store(db_path) as s:
        s.create_machine("m", 64 << 20)
    _seal(db_path, "lu-v5", 0x7, unpreserved=0x8)
    assert _would_lose(url) == [
        "2 handover entries with descriptors of a version other than 1",
        "the kernel profile of 1 boot(s) that wrote a handover not as lu-v3",
        "1 KHO root(s) with kexec metadata and LUO header",
        "1 LUO FLB(s)",
    ]
    migrate.downgrade(url, "0006", force=True)
    assert sql(db_path, "SELECT count(*) FROM handover_entry") == [(0,)]
    tables = {r[0] for r in sql(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not tables & {"kho_root", "kho_subnode", "luo_file", "luo_flb"}
    migrate.upgrade(url)
    engine = make_engine(url, create=False)
    with engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) >= {"kho_root", "kho_subnode", "luo_file", "luo_flb"}
    engine.dispose()
    assert _would_lose(url) == []  # the boot now reads as one from before profiles (lu-v3)
