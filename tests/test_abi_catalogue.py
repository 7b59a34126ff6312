"""The descriptor catalogue, its registration API, the committed JSON Schemas, user profiles, and the
pre-flight of profile pairs (in-process; ``test_abi_profiles_processes.py`` runs them across processes)."""

from __future__ import annotations

import json
import sqlite3
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict

from iommupt_store.abi import catalogue, profiles, register_converter, register_descriptor
from iommupt_store.abi.compat import compat
from iommupt_store.abi.profiles import SHIPPED, get_profile, load_profile_file
from iommupt_store.domains import domain_alloc
from iommupt_store.errors import AlreadyExists, BadData, InvalidArgument
from iommupt_store.liveupdate import liveupdate, preserve_domain, restore_domain
from iommupt_store.store import Store

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schema"


def _committed() -> dict[str, dict[str, Any]]:
    out = {f"{k}-v{v}.json": catalogue.json_schema(k, v) for k in catalogue.KINDS for v in (1, 2)}
    out["profiles.json"] = profiles.profile_file_schema()
    return out


@pytest.mark.parametrize("name", sorted(_committed()))
def test_committed_schemas_match_the_models(name: str) -> None:
    kind, _, version = name.removesuffix(".json").partition("-v")
    regenerate = f"iommupt-store schema {kind} {version}".strip() + f" > docs/schema/{name}"
    path = SCHEMA_DIR / name
    assert path.is_file(), f"docs/schema/{name} is missing: regenerate it with '{regenerate}'"
    assert json.loads(path.read_text()) == _committed()[name], (
        f"docs/schema/{name} differs from the model: regenerate it with '{regenerate}'"
    )


def test_schema_command_prints_the_committed_schema(run_cli: Any) -> None:
    proc = run_cli("schema", "device", "2", db=None)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == json.loads((SCHEMA_DIR / "device-v2.json").read_text())
    listed = run_cli("schema", "--list", db=None).stdout.split("\n")
    assert listed[:5] == ["domain 1", "domain 2", "device 1", "device 2", "profiles"]
    proc = run_cli("schema", "domain", "9", db=None)
    assert proc.returncode == 65 and "not in the catalogue" in proc.stderr


def test_version_2_is_the_newest_series_layout() -> None:
    v1 = catalogue.DomainDescriptorV1(format="x86_64", top_table_phys=0x1000, top_level=3, vasz=48, sign_extend=True)
    path = catalogue.conversion_path("domain", 1, {2})
    assert path == [1, 2]
    v2 = catalogue.convert("domain", path, catalogue.dump_descriptor(v1), "test")
    assert (v2.compatible, v2.version, v2.flags, v2.top_table_phys) == ("iommu-liveupdate", 1, 0, 0x1000)
    dev1 = {
        "version": 1,
        "compatible": "iommu-device-v1",
        "segment": 0,
        "bus": 1,
        "devfn": 8,
        "did": 2,
        "domain_token": "0x10",
        "owner": "vm",
    }
    dev2 = catalogue.convert("device", [1, 2], dev1, "test")
    assert (dev2.dma_owner_token, dev2.bdf) == (0, "0000:01:01.0")
    # stored JSON stays strict: hex strings for u64, no extra fields, flags within DELETED|INCOMING
    stored = catalogue.dump_descriptor(v2)
    for bad in ({"top_table_phys": 4096}, {"extra": 1}, {"flags": 4}, {"version": 2}):
        with pytest.raises(BadData):
            catalogue.parse_descriptor("domain", 2, {**stored, **bad})


class DomainV7(BaseModel):
    """A user's version: version 2 plus one field."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    compatible: Literal["iommu-liveupdate"] = "iommu-liveupdate"
    version: Literal[1] = 1
    ref_count: int = 1
    flags: int = 0
    top_table_phys: str
    top_level: int
    vasz: int
    sign_extend: bool
    format: str
    oasz_lg2: int | None = None
    features: list[str] | None = None
    frames_digest: str | None = None
    numa_node: int = 0


def test_registration_errors_are_one_line() -> None:
    class Loose(BaseModel):
        compatible: str = "x"

    for call, err in (
        (lambda: register_descriptor("gpu", 7, DomainV7), "kind 'gpu'"),
        (lambda: register_descriptor("domain", 0, DomainV7), "from 1 to 1000"),
        (lambda: register_descriptor("domain", 7, dict), "not a pydantic model"),  # type: ignore[arg-type]
        (lambda: register_descriptor("domain", 7, Loose), "lacks field(s) flags"),
        (lambda: register_descriptor("domain", 1, DomainV7), "already registered"),
        (lambda: register_converter("domain", 2, 2, dict), "to itself"),
        (lambda: register_converter("domain", 1, 2, lambda d: d), "already registered"),
        (lambda: register_converter("domain", 2, 7, 5), "not callable"),  # type: ignore[arg-type]
    ):
        with pytest.raises((InvalidArgument, AlreadyExists)) as info:
            call()
        assert err in str(info.value) and "\n" not in str(info.value)


def test_a_failing_converter_is_bad_data() -> None:
    def broken(d: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("numa")

    register_descriptor("device", 8, catalogue.DeviceDescriptorV2)
    register_converter("device", 2, 8, broken)
    with pytest.raises(BadData, match="converter 2->8 failed: KeyError"):
        dev = catalogue.DeviceDescriptorV2(segment=0, bus=0, devfn=0, did=1, domain_token=1, owner="")
        catalogue.convert("device", [2, 8], catalogue.dump_descriptor(dev), "test")


PLUGIN = """
from typing import Any, Literal
from pydantic import BaseModel, ConfigDict
from iommupt_store.abi import catalogue, register_converter, register_descriptor

class DomainV7(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    compatible: Literal["iommu-liveupdate"] = "iommu-liveupdate"
    version: Literal[1] = 1
    ref_count: int = 1
    flags: int = 0
    top_table_phys: catalogue.HexU64
    top_level: int
    vasz: int
    sign_extend: bool
    format: str
    oasz_lg2: int | None = None
    features: list[str] | None = None
    frames_digest: str | None = None
    numa_node: int = 0

def up(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "numa_node": 0}

def register() -> None:
    register_descriptor("domain", 7, DomainV7)
    register_descriptor("device", 7, catalogue.DeviceDescriptorV2)
    register_converter("domain", 2, 7, up)
    register_converter("device", 2, 7, lambda d: d)
"""


def test_a_user_version_through_a_profile_file_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_path: Path
) -> None:
    (tmp_path / "abi_plugin_v7.py").write_text(PLUGIN)  # next to the profile file: found without PYTHONPATH
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader appends the file's directory
    kernels = tmp_path / "kernels.json"
    kernels.write_text(
        json.dumps(
            {
                "plugins": ["abi_plugin_v7:register"],
                "profiles": {"lu-v7": {"base": "lu-v5", "writes": 7, "reads": [7], "converts": [2]}},
            }
        )
    )
    [p] = load_profile_file(kernels)
    assert sys.path[-1] == str(tmp_path.resolve())  # searched last: it hides no installed module
    assert get_profile("lu-v7") == p and catalogue.versions("domain")[-1] == 7
    assert compat(SHIPPED["lu-v5"], p).outcome == "converted"
    assert compat(p, SHIPPED["lu-v5"]).outcome == "panic"
    with Store.init(db_path) as store:
        store.create_machine("m", 64 << 20)
        m = store.machine("m", kernel="lu-v5")
        with m.transaction() as tx:
            dom = domain_alloc(tx, "x86_64")
            dom.map_range(0x1000, 0x200000, 0x1000)
            preserve_domain(tx, dom.id, 0x5)
        liveupdate(m)
        m2 = store.machine("m", kernel="lu-v7")  # converts the lu-v5 handover's version 2 to 7
        with m2.transaction() as tx:
            assert restore_domain(tx, 0x5).state == "restored"
            dom = domain_alloc(tx, "x86_64")
            desc = preserve_domain(tx, dom.id, 0x6)
        assert type(desc).__name__ == "DomainV7" and desc.numa_node == 0
        assert m2.profile_name == "lu-v7"
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT abi_version FROM handover_entry WHERE token = 6").fetchall() == [(7,)]
    conn.close()


def test_schema_shows_a_version_from_a_plugin_next_to_its_profile_file(run_cli: Any, tmp_path: Path) -> None:
    lab = tmp_path / "lab"  # not the process's working directory, nor on PYTHONPATH
    lab.mkdir()
    (lab / "abi_plugin_v7.py").write_text(PLUGIN)
    (lab / "kernels.toml").write_text('plugins = ["abi_plugin_v7:register"]\n')
    listed = run_cli("--profiles", str(lab / "kernels.toml"), "schema", "--list", db=None)
    assert listed.returncode == 0 and "domain 7" in listed.stdout.split("\n"), listed.stderr
    proc = run_cli("schema", "domain", "7", db=None, env={"IOMMUPT_PROFILES": str(lab / "kernels.toml")})
    assert proc.returncode == 0 and "numa_node" in json.loads(proc.stdout)["properties"], proc.stderr


def test_entry_point_plugins_run_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class EP:
        name, value = "demo", "tests.test_abi_catalogue:_entry_point_target"

    monkeypatch.setattr(profiles, "entry_points", lambda group: [EP] if group == "iommupt_store.abi" else [])
    monkeypatch.setitem(sys.modules, "tests.test_abi_catalogue", sys.modules[__name__])
    monkeypatch.setattr(sys.modules[__name__], "_entry_point_target", lambda: calls.append(1), raising=False)
    profiles.load_entry_point_plugins()
    profiles.load_entry_point_plugins()
    assert calls == [1]


def test_profile_file_in_toml_inherits(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text(
        textwrap.dedent(
            """
            [profiles.lu-v5-reads-v1-toml]
            base = "lu-v5"
            converts = [1]
            """
        )
    )
    [p] = load_profile_file(path)
    assert (p.kho, p.luo, p.writes, p.reads, p.converts) == ("kho-v4", "luo-v5", 2, [2], [1])
    report = compat(SHIPPED["lu-v3"], p)
    assert report.readable and report.outcome == "converted"
    assert [k.outcome for k in report.kinds] == ["read", "read", "converted", "converted"]


@pytest.mark.parametrize(
    ("frm", "to", "outcome"),
    [
        ("lu-v3", "lu-v3", "restored"),
        ("lu-v3", "lu-v5", "cold boot"),
        ("lu-v5", "lu-v3", "cold boot"),
        ("lu-v5", "lu-v5", "restored"),
    ],
)
def test_shipped_pairs(frm: str, to: str, outcome: str) -> None:
    report = compat(SHIPPED[frm], SHIPPED[to])
    assert report.outcome == outcome and report.readable == (outcome == "restored")
    assert [k.kind for k in report.kinds] == ["kho", "luo", "domains", "devices"]
