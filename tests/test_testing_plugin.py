"""The pytest plugin (``iommupt_store.testing``), used the way our users use it.

Each test writes a test file into a fresh directory with ``pytester`` and runs pytest on it in a new
process (``runpytest_subprocess``), so the plugin is found through its ``pytest11`` entry point, as after
``pip install iommupt-store``; the inner tests use nothing but the public fixtures.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

#: the complete example of the README's "Testing your own restart scenarios"
EXAMPLE = '''\
"""A live update across real processes: a process exit is the kexec."""

from iommupt_store.domains import domain_alloc, frame_counts
from iommupt_store.liveupdate import liveupdate, preserve_domain, restore_domain
from iommupt_store.testing import assert_translations

TOKEN = 0x100
IOVA, PADDR, SIZE = 0x40000000, 0x100000000, 4 << 20


def boot2(machine, old_id):
    """Boot 2, in a new process: only database rows came across."""
    with machine.transaction() as tx:
        # DMA never stopped: the IOMMU still walks boot 1's tables, under boot 1's domain id
        assert_translations(tx, old_id, [(IOVA, PADDR, SIZE, "rw")])
        dom = restore_domain(tx, TOKEN)
        report = assert_translations(tx, dom.id, [(IOVA, PADDR, SIZE, "rw")])  # every 4 KiB page
        dom.free()
        assert frame_counts(tx) == {}
    return report.summary.translations


def test_dma_survives_liveupdate(iommupt_machine, iommupt_boot):
    with iommupt_machine.transaction() as tx:  # boot 1: this process
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(IOVA, PADDR, SIZE)
        preserve_domain(tx, dom.id, TOKEN)
    liveupdate(iommupt_machine)  # the kexec: boot 1 ends here
    assert iommupt_boot.run(boot2, dom.id, expect_boot=2) == SIZE // 4096


# Both kernels as children, and a crash in the middle of the seal:


def build(machine):
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(IOVA, PADDR, SIZE)
        preserve_domain(tx, dom.id, TOKEN)
    return dom.id


def seal(machine):
    liveupdate(machine)
    return machine.boot_number


def test_crash_during_seal_then_liveupdate(iommupt_boot):
    old_id = iommupt_boot.run(build)  # boot 1: a child
    iommupt_boot.crash(seal, at="seal")  # SIGKILL inside liveupdate: nothing sealed
    assert iommupt_boot.run(seal, expect_boot=1) == 1  # boot 1 still runs; seal it now
    assert iommupt_boot.run(boot2, old_id, expect_boot=2) == SIZE // 4096
'''

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Testing your own restart scenarios"


def test_readme_example_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_restart=EXAMPLE)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_readme_shows_this_example() -> None:
    if not README.exists() or SECTION not in README.read_text():
        pytest.skip(f"README.md has no {SECTION!r} section")
    section = README.read_text().split(SECTION, 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None, "the section has no python block"
    assert block.group(1) == EXAMPLE


FAILING = """\
import time

import pytest

from iommupt_store.liveupdate import liveupdate, restore_domain
from iommupt_store.testing import BootFailed


def restore_wrong_token(machine):
    with machine.transaction() as tx:
        restore_domain(tx, 0x999)


def wrong_boot(machine):
    assert machine.boot_number == 7


def not_json(machine):
    return machine


def sleeps(machine):
    time.sleep(30)


def quiet(machine):
    return None


def test_library_error(iommupt_machine, iommupt_boot):
    liveupdate(iommupt_machine)
    iommupt_boot.run(restore_wrong_token)


def test_assert_in_child(iommupt_boot):
    iommupt_boot.run(wrong_boot)


def test_not_json(iommupt_boot):
    iommupt_boot.run(not_json)


def test_expect_boot(iommupt_machine, iommupt_boot):
    iommupt_boot.run(quiet, expect_boot=2)


def test_timeout(iommupt_boot):
    iommupt_boot.run(sleeps, timeout=0.5)


def test_lambda(iommupt_boot):
    iommupt_boot.run(lambda machine: 1)


def test_crash_point_not_reached(iommupt_boot):
    iommupt_boot.crash(quiet, at="seal")


def test_expected_failure(iommupt_boot):
    with pytest.raises(BootFailed) as info:
        iommupt_boot.run(wrong_boot)
    assert info.value.boot == 1 and info.value.returncode == 1
    assert "in wrong_boot" in info.value.stderr
"""


def test_failing_children_fail_clearly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fails=FAILING)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=7, passed=1)
    result.stdout.fnmatch_lines(
        [
            # which function, in which boot; the library's exception; the child's traceback
            "E * test_fails.restore_wrong_token: the child process failed in boot 2 (exit status 1)",
            "E * calling test_fails.restore_wrong_token: *NotFound: *handed nothing over under token 0x999*",
            "E * --- child stderr ---",
            'E * File "*test_fails.py", line 11, in restore_wrong_token',
            # asserts in the child are rewritten by pytest
            "E * calling test_fails.wrong_boot: AssertionError: assert 1 == 7",
            "E * +  where 1 = <iommupt_store.machine.Machine object at *>.boot_number",
            "E * returning from test_fails.not_json: TypeError: * not JSON-serializable: *",
            "E * checking expect_boot: AssertionError: expected to attach to boot 2, attached to boot 1 "
            "(did the previous kernel end with liveupdate?)",
            "E * test_fails.sleeps: the child process did not finish within 0.5 s and was killed",
            "E * TypeError: <function test_lambda.<locals>.<lambda> at *> cannot run in a child process: *",
            "E * test_fails.quiet with IOMMUPT_CRASHPOINT=seal: the child process never reached the crash point "
            "in boot 1 (exit status 0)",
        ],
        consecutive=False,
    )


FEATURES = """\
import os
import sys

import pytest

from iommupt_store.store import Store


def report(machine, *args):
    print("hello from boot", machine.boot_number)
    return {"boot": machine.boot_number, "mem": machine.mem_bytes, "args": list(args),
            "env": [os.environ["IOMMUPT_DB"], os.environ["IOMMUPT_MACHINE"], os.environ.get("EXTRA")],
            "pid": os.getpid()}


def cold_reboot(machine):
    machine.reboot()


def test_db_is_a_fresh_store(iommupt_db):
    with Store(iommupt_db) as store:
        assert store.status().machines == []


def test_machine_in_this_process(iommupt_machine, iommupt_db):
    assert (iommupt_machine.name, iommupt_machine.boot_number, iommupt_machine.mem_bytes) == ("test", 1, 16 << 20)
    assert iommupt_machine.store.url.endswith(str(iommupt_db))


@pytest.mark.iommupt(mem="64M")
def test_marker_sets_memory(iommupt_machine):
    assert iommupt_machine.mem_bytes == 64 << 20


def test_run_in_children(iommupt_boot, iommupt_db, capsys):
    out = iommupt_boot.run(report, 1, (2, 3), "x", env={"EXTRA": "yes"})
    assert out["pid"] != os.getpid()
    assert out == {**out, "boot": 1, "mem": 16 << 20, "args": [1, [2, 3], "x"],
                   "env": [str(iommupt_db), "test", "yes"]}
    assert "hello from boot 1" in capsys.readouterr().out
    iommupt_boot.run(cold_reboot, expect_boot=1)
    assert iommupt_boot.run(report)["boot"] == 2 == iommupt_boot.last_boot


def test_crash_while_attaching(iommupt_boot):
    assert iommupt_boot.crash(report, at="boot_start") is None
    assert iommupt_boot.crash(cold_reboot, at="before_commit") == 1
    assert iommupt_boot.run(report)["boot"] == 1


def test_run_script(iommupt_boot, tmp_path):
    code = "import os, sys, iommupt_store; m = iommupt_store.open(machine=os.environ['IOMMUPT_MACHINE']);"
    code += " print(m.boot_number, *sys.argv[1:])"
    assert iommupt_boot.run_script(code, "a", "b").stdout == "1 a b\\n"
    script = tmp_path / "s.py"
    script.write_text("import sys; sys.exit('bad: ' + sys.argv[1])")
    assert iommupt_boot.run_script(script, "x", check=False).returncode == 1
    with pytest.raises(AssertionError, match="bad: y"):
        iommupt_boot.run_script(script, "y")
"""


def test_fixtures_and_settings(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\niommupt_mem = 16M\niommupt_timeout = 30\n")
    pytester.makepyfile(test_features=FEATURES)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(iommupt_db):\n    pass\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-p", "no:iommupt_store")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'iommupt_db' not found*"])


TRANSLATIONS = """\
import pytest

from iommupt_store.domains import domain_alloc
from iommupt_store.testing import assert_translations


def test_assert_translations(iommupt_machine):
    with iommupt_machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0x0, 0x100000000, 0x4000)
        dom.map_range(0x200000, 0x200000, 0x1000, 1)
    report = assert_translations(iommupt_machine, dom.id)  # the recorded runs
    assert report.summary.translations == 5
    read_only = {"iova": 0x200000, "phys": 0x200000, "length": 0x1000, "prot": "r"}
    assert_translations(iommupt_machine, dom.id, [(0x0, 0x100000000, 0x4000), read_only])
    with pytest.raises(AssertionError) as err:
        assert_translations(iommupt_machine, dom.id, [(0x0, 0x100000000, 0x8000, "rw")])
    assert str(err.value).splitlines() == [
        f"domain {dom.id}: 2 run(s) translate otherwise than the given runs:",
        "  missing [0x4000, +0x4000): expected 0x100004000 rw, found nothing",
        "  unexpected [0x200000, +0x1000): expected nothing, found 0x200000 r-",
    ]
"""


def test_assert_translations(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_translations=TRANSLATIONS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
