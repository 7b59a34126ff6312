"""Kernel profiles across real processes: what ``compat`` and ``liveupdate --next`` predict is what the
next process then does with the handover (restore, convert, refuse to start, or boot as if cold).

Process 1 preserves a domain and a device in a session and seals under FROM; process 2 attaches under
TO and retrieves the session and restores the domain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import RunCli, RunPy, one_error_line, sqlite_dump

USER_PROFILES = """\
[profiles.lu-v5-reads-v1]
base = "lu-v5"
description = "lu-v5 that reads the series v3 handover through the built-in 1->2 converters"
converts = [1]

[profiles.lu-v5-kho2]
base = "lu-v5"
description = "reads kho-v2 and luo-v3 but not version-1 IOMMU descriptors"
kho_reads = ["kho-v2"]
luo_reads = ["luo-v3"]

[profiles.lu-v6-luo]
base = "lu-v5"
luo = "luo-v6"
"""

# (FROM, TO, what compat predicts)
PAIRS = [
    ("lu-v3", "lu-v3", "restored"),
    ("lu-v3", "lu-v5", "cold boot"),
    ("lu-v5", "lu-v3", "cold boot"),
    ("lu-v5", "lu-v5", "restored"),
    ("lu-v3", "lu-v5-reads-v1", "converted"),
    ("lu-v3", "lu-v5-kho2", "panic"),
    ("lu-v5", "lu-v6-luo", "panic"),
]
TOKEN, DEV_TOKEN, BDF = "0x10", "0x11", "0000:3b:00.1"
BUILD = """
import sys
import iommupt_store
from iommupt_store.devices import attach
from iommupt_store.domains import domain_alloc
from iommupt_store.liveupdate.sessions import create_session, preserve_device, preserve_domain_in_session

machine = iommupt_store.create(sys.argv[1], "default", mem="64M", kernel=sys.argv[2])
with machine.transaction() as tx:
    dom = domain_alloc(tx, "x86_64")
    dom.map_range(0x0, 0x100000, 0x2000)
    create_session(tx, "s1")
    attach(tx, "0000:3b:00.1", dom.id, owner="vm1", did=3)
    preserve_domain_in_session(tx, "s1", dom.id, 0x10)
    preserve_device(tx, "s1", "0000:3b:00.1", 0x11)
"""


@pytest.fixture
def profiles_file(tmp_path: Path) -> Path:
    path = tmp_path / "kernels.toml"
    path.write_text(USER_PROFILES)
    return path


def _ok(proc: object) -> None:
    assert getattr(proc, "returncode", None) == 0, (getattr(proc, "stdout", ""), getattr(proc, "stderr", ""))


@pytest.mark.parametrize(("frm", "to", "predicted"), PAIRS, ids=[f"{a}->{b}" for a, b, _ in PAIRS])
def test_compat_predicts_what_the_next_process_does(
    run_cli: RunCli, run_py: RunPy, db_path: Path, profiles_file: Path, frm: str, to: str, predicted: str
) -> None:
    k1 = ["--profiles", str(profiles_file), "--kernel", frm]
    # process 1 builds through the API under FROM (one process: the CLI below does the rest)
    proc = run_py(BUILD, str(db_path), frm, env={"IOMMUPT_PROFILES": str(profiles_file)})
    assert proc.returncode == 0, proc.stderr

    # the pre-flight, for the pair and for what is actually preserved, agree
    pair = run_cli("--profiles", str(profiles_file), "compat", frm, to, "--json")
    report = json.loads(pair.stdout)
    assert report["outcome"] == predicted
    readable = predicted in ("restored", "converted")
    assert pair.returncode == (0 if readable else 1)
    before = sqlite_dump(db_path)
    nxt = run_cli(*k1, "liveupdate", "--next", to, "--json")
    if not readable:
        assert nxt.returncode == 1
        assert json.loads(nxt.stdout)["outcome"] == predicted
        assert "refusing to seal" in one_error_line(nxt.stderr)
        assert sqlite_dump(db_path) == before  # nothing sealed
        _ok(run_cli(*k1, "liveupdate"))
    else:
        _ok(nxt)
        sealed = json.loads(nxt.stdout)
        assert sealed["next"]["outcome"] == predicted
        assert sealed["kexec_count"] == (None if frm == "lu-v3" else 1)  # kho-v2 had no kexec-metadata
        kinds = {k["kind"]: k for k in sealed["next"]["kinds"]}
        assert kinds["domains"]["objects"] == 1 and kinds["devices"]["objects"] == 1

    # process 2: the next kernel
    k2 = ["--profiles", str(profiles_file), "--kernel", to]
    before = sqlite_dump(db_path)
    retrieve = run_cli(*k2, "session", "retrieve", "s1")
    status = json.loads(run_cli("status", "--json").stdout)["machines"][0]["boots"]
    if predicted == "panic":
        assert retrieve.returncode == 65
        assert "nothing changed" in one_error_line(retrieve.stderr)
        assert sqlite_dump(db_path) == before
        assert [b["number"] for b in status] == [1]
        # inspecting still works; a compatible kernel then restores it
        _ok(run_cli("handover"))
        k2 = ["--kernel", frm]
        _ok(run_cli(*k2, "session", "retrieve", "s1"))
    elif predicted == "cold boot":
        assert retrieve.returncode == 1, retrieve.stderr
        assert "discarded" in one_error_line(retrieve.stderr)
        assert status[-1]["handover_discarded"] and status[-1]["kernel_profile"] == to
        handover = json.loads(run_cli("handover", "--json").stdout)
        assert handover["discarded"] and handover["incoming"] == []
        assert all(d["state"] == "freed" for d in json.loads(run_cli("domains", "--json").stdout))
        return
    else:
        _ok(retrieve)
        assert status[-1]["kernel_profile"] == to and status[-1]["handover_discarded"] is None
    restored = run_cli(*k2, "restore", "--token", TOKEN, "--json")
    _ok(restored)
    devices = json.loads(run_cli("devices", "--json").stdout)
    assert [(d["bdf"], d["did"]) for d in devices] == [(BDF, 3)]
    assert devices[0]["domain"] == json.loads(restored.stdout)["id"]
    # the next seal counts the kexec on
    sealed = run_cli(*k2, "liveupdate", "--json")
    _ok(sealed)
    final = frm if predicted == "panic" else to  # after a panic, the compatible kernel restored it
    assert json.loads(sealed.stdout)["kexec_count"] == (None if final == "lu-v3" else 1 if frm == "lu-v3" else 2)


def test_a_running_boot_keeps_its_kernel(run_cli: RunCli) -> None:
    _ok(run_cli("--kernel", "lu-v3", "init", "--mem", "64M"))
    _ok(run_cli("--kernel", "lu-v3", "domain", "create", "x86_64"))
    _ok(run_cli("domain", "create", "x86_64"))  # no explicit profile: the running boot's
    proc = run_cli("--kernel", "lu-v5", "domain", "create", "x86_64")
    assert proc.returncode == 1
    assert "cannot change" in one_error_line(proc.stderr)
    proc = run_cli("domain", "create", "x86_64", env={"IOMMUPT_KERNEL": "lu-v5"})
    assert proc.returncode == 1
    status = json.loads(run_cli("status", "--json").stdout)["machines"][0]["boots"]
    assert [(b["number"], b["kernel_profile"]) for b in status] == [(1, "lu-v3")]


def test_profile_options_refuse_bad_input(run_cli: RunCli, tmp_path: Path, db_path: Path) -> None:
    _ok(run_cli("init", "--mem", "64M"))
    before = sqlite_dump(db_path)
    proc = run_cli("--kernel", "lu-v9", "domain", "create", "x86_64")
    assert proc.returncode == 2 and "unknown kernel profile 'lu-v9'" in one_error_line(proc.stderr)
    bad = tmp_path / "bad.toml"
    for text, needle in (
        ('[profiles.x]\nbase = "lu-v5"\nwrites = 7\n', "field writes"),
        ('[profiles.x]\nbase = "lu-v5"\nconverts = [3]\n', "field converts"),
        ('[profiles.x]\nbase = "nope"\n', "field base"),
        ('[profiles.x]\nkho = "kho-v4"\n', "field release"),
        ("[profiles.lu-v5]\n", "cannot be redefined"),
        ('plugins = ["no_such_module:register"]\n', "plug-in no_such_module:register"),
        ("[profiles\n", "not valid TOML"),
        ('[profiles.x]\nbase = "lu-v5"\nextra = 1\n', "profiles.x.extra"),
    ):
        bad.write_text(text)
        proc = run_cli("--profiles", str(bad), "profiles")
        assert proc.returncode == 1, (text, proc.stderr)
        line = one_error_line(proc.stderr)
        assert str(bad) in line and needle in line, line
    proc = run_cli("profiles", env={"IOMMUPT_PROFILES": str(tmp_path / "missing.toml")})
    assert proc.returncode == 1 and "cannot read it" in one_error_line(proc.stderr)
    assert sqlite_dump(db_path) == before
