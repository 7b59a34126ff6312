"""The Python API as a newcomer meets it: one call to create a store and a machine, domain options that
mean what they say, and the README's session-and-device restart example, checked as it is printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import iommupt_store
from iommupt_store import liveupdate
from iommupt_store.devices import attach, dma_walker, replace
from iommupt_store.domains import domain_alloc, hardware_walker
from iommupt_store.errors import AlreadyExists, InvalidArgument, NotFound
from iommupt_store.machine import Machine
from tests.conftest import SUBPROCESS_TIMEOUT, InvokeCli, subprocess_env

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"

#: the complete example of the README's "A device in a session"
SESSION_EXAMPLE = '''\
"""A VM's device keeps doing DMA across a live update: its vtdss domain and the device in a LUO session."""

from iommupt_store.devices import attach, dma_walker, list_devices, replace
from iommupt_store.domains import domain_alloc
from iommupt_store.liveupdate import (
    create_session,
    finish_session,
    liveupdate,
    preserve_device,
    preserve_domain_in_session,
    restore_domain,
    retrieve_session,
)

BDF, OWNER, SESSION = "0000:3b:00.1", "vfio-vm1", "vm1"
DOMAIN_TOKEN, DEVICE_TOKEN = 0x10, 0x11
IOVA, PADDR, SIZE = 0x0, 0x80000000, 2 << 20


def boot2(machine):
    """Boot 2, in a new process: the device never stopped translating; the VMM takes it back."""
    with machine.transaction() as tx:
        assert dma_walker(tx, BDF).translate(IOVA + 0x1234).phys == PADDR + 0x1234  # boot 1's tables
        retrieve_session(tx, SESSION)
        dom = restore_domain(tx, DOMAIN_TOKEN)  # re-attaches the device, with its domain id
        [device] = list_devices(tx)
        assert (device.domain, device.attachment) == (dom.id, "attached")
        new = domain_alloc(tx, "vtdss", top_level=2)  # the VMM's new domain
        new.map_range(IOVA, PADDR, SIZE)
        freed = replace(tx, BDF, new.id, owner=OWNER)  # moves the device; the restored domain is freed
        assert dma_walker(tx, BDF).translate(IOVA + SIZE - 1).phys == PADDR + SIZE - 1
        report = finish_session(tx, SESSION)
    return freed == dom.id, report.devices_reattached, report.never_reclaimed


def test_device_dma_survives_liveupdate(iommupt_machine, iommupt_boot):
    with iommupt_machine.transaction() as tx:  # boot 1: this process
        dom = domain_alloc(tx, "vtdss", top_level=2)  # 3 levels: a 39-bit IOVA space
        dom.map_range(IOVA, PADDR, SIZE)
        attach(tx, BDF, dom.id, owner=OWNER)
        create_session(tx, SESSION)
        preserve_domain_in_session(tx, SESSION, dom.id, DOMAIN_TOKEN)
        preserve_device(tx, SESSION, BDF, DEVICE_TOKEN)
    liveupdate(iommupt_machine)  # the kexec: boot 1 ends here
    assert iommupt_boot.run(boot2, expect_boot=2) == [True, [BDF], []]
'''


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    assert heading in text, f"README.md has no {heading!r}"
    block = re.search(r"```python\n(.*?)```", text.split(heading, 1)[1], re.S)
    assert block is not None, f"{heading!r} has no python block"
    return block.group(1)


# -- one call to start ---------------------------------------------------------------------------------
def test_create_then_open(tmp_path: Path) -> None:
    db = tmp_path / "lab.db"
    machine = iommupt_store.create(db, "host1", mem="4G")
    assert (machine.name, machine.boot_number, machine.mem_bytes) == ("host1", 1, 4 << 30)
    with machine.transaction() as tx:
        domain_alloc(tx, "x86_64").map_range(0, 0x1000, 0x1000)
    again = iommupt_store.open(db, "host1")
    assert again.boot_number == 1
    with pytest.raises(AlreadyExists):
        iommupt_store.create(db, "host1")
    second = iommupt_store.create(db, "host2", mem=64 << 20)  # an existing store gets another machine
    assert (second.mem_bytes, second.boot_number) == (64 << 20, 1)
    with pytest.raises(NotFound):
        iommupt_store.open(db, "host3")


@pytest.mark.parametrize("mem", ["4X", "-1G", "0x1001", "1K"])
def test_create_refuses_a_bad_size_before_creating_anything(tmp_path: Path, mem: str) -> None:
    with pytest.raises(InvalidArgument):
        iommupt_store.create(tmp_path / "lab.db", mem=mem)
    if mem in ("4X", "-1G"):  # not a number at all: nothing was created
        assert not (tmp_path / "lab.db").exists()


def test_readme_python_api_example_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _python_block_after("## Python API")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "39 0x80001234\n"


# -- domain options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "options", "top_level", "vasz"),
    [
        ("vtdss", {"top_level": 2}, 2, 39),
        ("vtdss", {"top_level": 3}, 3, 48),
        ("vtdss", {"top_level": 4}, 4, 57),
        ("vtdss", {"vasz": 39}, 2, 39),
        ("vtdss", {"vasz": 57}, 4, 57),
        ("vtdss", {}, 3, 48),
        ("x86_64", {"top_level": 4}, 4, 57),
        ("x86_64", {"vasz": 57}, 4, 57),
        ("riscv", {"top_level": 2}, 2, 39),
        ("riscv", {"top_level": 4}, 4, 57),
        ("amdv1", {"top_level": 3}, 3, 48),  # a dynamic top: where it starts; it grows to 64 bits
    ],
)
def test_one_of_top_level_and_vasz_selects_the_other(
    machine: Machine, fmt: str, options: dict[str, int], top_level: int, vasz: int
) -> None:
    with machine.transaction() as tx:
        dom = domain_alloc(tx, fmt, **options)
        info = dom.info()
        assert (info.top_level, info.range_vasz_lg2) == (top_level, vasz)
        # the top decodes every bit: the last page below 2**vasz maps and translates
        iova = (1 << (vasz - 1)) - 0x1000 if info.sign_extend else (1 << vasz) - 0x1000
        dom.map_range(iova, 0x5000, 0x1000)
        assert hardware_walker(tx, dom.id).translate(iova + 0x12).phys == 0x5012


def test_cli_top_level_alone_selects_the_width(machine: Machine, cli: InvokeCli) -> None:
    result = cli("-m", "test", "domain", "create", "vtdss", "--top-level", "2", "--json")
    assert result.exit_code == 0, result.output
    assert "39" in result.output


def test_a_top_level_that_cannot_decode_the_asked_width_is_refused(machine: Machine) -> None:
    with machine.transaction() as tx, pytest.raises(iommupt_store.IommuptError, match="does not fit"):
        domain_alloc(tx, "vtdss", top_level=2, vasz=48)


def test_features_replace_the_defaults(machine: Machine) -> None:
    with machine.transaction() as tx:
        default = domain_alloc(tx, "x86_64").info()
        assert default.sign_extend and default.features == ["SIGN_EXTEND"]
        kept = domain_alloc(tx, "x86_64", features=["SIGN_EXTEND"]).info()
        assert kept.features == default.features
        replaced = domain_alloc(tx, "x86_64", vasz=47, features=[]).info()
        assert not replaced.sign_extend and replaced.features == []
        vtd = domain_alloc(tx, "vtdss", features=["DMA_INCOHERENT"]).info()
        assert vtd.features == ["DMA_INCOHERENT"]
        amd = domain_alloc(tx, "amdv1", features=[]).info()  # force-enabled features stay
        assert "DYNAMIC_TOP" in amd.features
        with pytest.raises(InvalidArgument, match="NO_SUCH_FEATURE"):
            domain_alloc(tx, "x86_64", features=["NO_SUCH_FEATURE"])


# -- sessions and devices are public ----------------------------------------------------------------------
def test_session_and_device_functions_are_public() -> None:
    for name in (
        "create_session",
        "preserve_domain_in_session",
        "preserve_device",
        "close_session",
        "retrieve_session",
        "finish_session",
        "list_sessions",
        "liveupdate",
        "restore_domain",
    ):
        assert name in liveupdate.__all__ and name in (liveupdate.__doc__ or ""), name
    for fn in (attach, replace, dma_walker):
        assert fn.__doc__, fn.__name__


def test_readme_session_example_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_vm_restart=SESSION_EXAMPLE)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_readme_shows_the_session_example() -> None:
    assert _python_block_after("### A device in a session") == SESSION_EXAMPLE
