"""Several processes on one store: visibility, crashes (``kill -9``), concurrent writers, frame bytes.

Each child is a fresh interpreter that opens its own engine ("process exit = kexec":
nothing crosses in memory). The parent inspects the database with plain ``sqlite3``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from iommupt_store.crash import ENV as CRASH_ENV
from iommupt_store.memory import FIRST_PFN, PAGE_SIZE
from iommupt_store.store import Store
from tests.conftest import SUBPROCESS_TIMEOUT, RunCli, RunPy, integrity, sqlite_dump, subprocess_env

KILLED = -signal.SIGKILL


def pages(path: Path, machine: str = "default") -> dict[int, bytes]:
    """pfn -> contents of one machine, read with the sqlite3 module (not our code)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT pfn, contents FROM page JOIN machine ON machine.id = page.machine_id WHERE machine.name = ?",
            (machine,),
        ).fetchall()
    finally:
        conn.close()
    return {pfn: bytes(blob) for pfn, blob in rows}


def assert_sound(path: Path) -> None:
    check, fks = integrity(path)
    assert check == "ok"
    assert fks == []


# -- visibility ---------------------------------------------------------------------------------------------

WRITE_PAGES = """
import sys
from iommupt_store import Store
store = Store(sys.argv[1])
m = store.machine(sys.argv[2])
with m.transaction() as tx:
    for i in range(int(sys.argv[3])):
        pfn = tx.memory.alloc("test")
        tx.memory.write(pfn, bytes([i % 251 + 1]) * 4096)
print(m.boot_number)
"""

READ_STATUS = """
import sys
from iommupt_store import Store
print(Store(sys.argv[1]).status().model_dump_json())
"""


@pytest.mark.crash
def test_init_by_cli_is_readable_by_other_processes(run_cli: RunCli, run_py: RunPy, db_path: Path) -> None:
    assert run_cli("-m", "host", "init", "--mem", "8M").returncode == 0
    r = run_py(READ_STATUS, str(db_path))
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [m["name"] for m in st["machines"]] == ["host"]
    assert st["machines"][0]["boots"][0]["number"] == 1

    w = run_py(WRITE_PAGES, str(db_path), "host", "25")
    assert w.returncode == 0, w.stderr
    assert w.stdout.strip() == "1"  # the writer attached to the boot init started
    st = json.loads(run_py(READ_STATUS, str(db_path)).stdout)
    assert st["machines"][0]["pages_allocated"] == 25
    r = run_cli("-m", "host", "status", "--json")
    assert json.loads(r.stdout)["machines"][0]["pages_allocated"] == 25


@pytest.mark.crash
def test_open_machine_sees_what_another_process_committed(run_py: RunPy, store: Store, db_path: Path) -> None:
    store.create_machine("default", 8 << 20)
    m = store.machine("default")
    with m.transaction() as tx:
        mine = tx.memory.alloc("test")
    w = run_py(WRITE_PAGES, str(db_path), "default", "3")
    assert w.returncode == 0, w.stderr
    with m.transaction() as tx:
        assert tx.memory.read(mine + 1) == bytes([1]) * PAGE_SIZE
        assert tx.memory.alloc("test") == mine + 4  # the allocator sees the other process's pages


# -- kill -9 at a crash point ---------------------------------------------------------------------------------

TWO_TRANSACTIONS = """
import sys
from iommupt_store import Store
store = Store(sys.argv[1])
m = store.machine("default")
with m.transaction() as tx:
    for i in range(40):
        pfn = tx.memory.alloc("test")
        tx.memory.write(pfn, b"\\x01" * 4096)
print("committed", flush=True)
with m.transaction() as tx:          # a large write: 2,000 pages, updates and frees
    for i in range(2000):
        pfn = tx.memory.alloc("test", order=i % 3 == 0 and 1 or 0)
        tx.memory.write(pfn, b"\\x02" * 64)
    for pfn in range(0x100, 0x100 + 20):
        tx.memory.write(pfn, b"\\x03" * 4096)
    for pfn in range(0x100 + 20, 0x100 + 40):
        tx.memory.free(pfn)
print("unreachable", flush=True)
"""


@pytest.fixture
def fresh_default(db_path: Path) -> Path:
    with Store.init(db_path) as s:
        s.create_machine("default", 64 << 20)
        s.machine("default")
    return db_path


@pytest.mark.crash
def test_kill_before_first_commit_keeps_initial_state(run_py: RunPy, fresh_default: Path) -> None:
    before = sqlite_dump(fresh_default)
    r = run_py(TWO_TRANSACTIONS, str(fresh_default), env={CRASH_ENV: "before_commit"})
    assert r.returncode == KILLED, r.stderr
    assert r.stdout == ""
    assert_sound(fresh_default)
    assert sqlite_dump(fresh_default) == before


@pytest.mark.crash
def test_kill_in_large_write_keeps_last_committed_state(run_py: RunPy, fresh_default: Path) -> None:
    r = run_py(TWO_TRANSACTIONS, str(fresh_default), env={CRASH_ENV: "before_commit:2"})
    assert r.returncode == KILLED, r.stderr
    assert r.stdout.split() == ["committed"]
    assert_sound(fresh_default)
    got = pages(fresh_default)
    assert sorted(got) == list(range(FIRST_PFN, FIRST_PFN + 40))
    assert set(got.values()) == {b"\x01" * PAGE_SIZE}
    # and the next process carries on from there
    with Store(fresh_default) as s, s.machine("default").transaction() as tx:
        assert tx.memory.alloc("test") == FIRST_PFN + 40


@pytest.mark.crash
def test_kill_while_starting_a_boot_keeps_the_old_boot(run_py: RunPy, fresh_default: Path) -> None:
    with Store(fresh_default) as s:
        s.machine("default").reboot(cold=True)
    before = sqlite_dump(fresh_default)
    r = run_py(WRITE_PAGES, str(fresh_default), "default", "1", env={CRASH_ENV: "boot_start"})
    assert r.returncode == KILLED, r.stderr
    assert_sound(fresh_default)
    assert sqlite_dump(fresh_default) == before
    with Store(fresh_default) as s:
        assert s.machine("default").boot_number == 2


# -- kill -9 at a random moment --------------------------------------------------------------------------------

GENERATIONS = """
import struct, sys
from iommupt_store import Store
store = Store(sys.argv[1])
m = store.machine("default")
while True:
    with m.transaction() as tx:
        mem = tx.memory
        counter = 0x100
        if not mem.is_allocated(counter):
            assert mem.alloc("counter") == counter
        gen = struct.unpack_from("<Q", mem.read(counter))[0] + 1
        old = sorted(p for p in range(0x101, 0x101 + 600) if mem.is_allocated(p))
        for pfn in old:
            mem.free(pfn)
        for j in range(200 + (gen % 3) * 100):        # 200, 300 or 400 pages: inserts, updates, deletes
            pfn = mem.alloc("gen")
            mem.write(pfn, bytes([gen % 256]) * 4096)
            mem.write(pfn, struct.pack("<QQ", gen, j))
        mem.write(counter, struct.pack("<Q", gen))
    print(gen, flush=True)
"""


def expected_generation(gen: int) -> dict[int, bytes]:
    import struct

    state = {FIRST_PFN: struct.pack("<Q", gen).ljust(PAGE_SIZE, b"\0")}
    for j in range(200 + (gen % 3) * 100):
        state[FIRST_PFN + 1 + j] = struct.pack("<QQ", gen, j) + bytes([gen % 256]) * (PAGE_SIZE - 16)
    return state


def _collect(stream: IO[str], into: list[int]) -> None:
    into.extend(int(line) for line in stream)


def _committed(path: Path) -> int:
    got = pages(path)
    if not got:
        return 0
    return int.from_bytes(got[FIRST_PFN][:8], "little")


@pytest.mark.crash
@pytest.mark.parametrize("round_", range(2))
def test_random_kill_leaves_one_committed_state(fresh_default: Path, round_: int) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    last_printed = 0
    for kill in range(3):  # three kills in a row; each new process carries on
        start = _committed(fresh_default)
        child = subprocess.Popen(
            [sys.executable, "-c", GENERATIONS, str(fresh_default)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=subprocess_env(),
        )
        printed: list[int] = []
        assert child.stdout is not None
        reader = threading.Thread(target=_collect, args=(child.stdout, printed), daemon=True)
        reader.start()
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not printed and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=SUBPROCESS_TIMEOUT)
        reader.join(timeout=SUBPROCESS_TIMEOUT)
        assert child.returncode == KILLED
        why = f"seed {seed}, kill {kill}, printed {printed[-3:]}"
        assert_sound(fresh_default)
        gen = _committed(fresh_default)
        assert printed and printed[0] == start + 1, why
        # the commit of the generation after the last printed one may have landed before the kill
        assert printed[-1] <= gen <= printed[-1] + 1, why
        assert pages(fresh_default) == expected_generation(gen), why
        assert gen > last_printed
        last_printed = gen


# -- two writers at once ---------------------------------------------------------------------------------------

WRITER = """
import os, sys, time
from iommupt_store import Store
path, who, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = Store(path)
m = store.machine("default")
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
for seq in range(n):
    with m.transaction() as tx:            # many small transactions
        pfn = tx.memory.alloc("writer%d" % who)
        tx.memory.write(pfn, b"%d:%d;" % (who, seq))
print("done", flush=True)
"""


@pytest.mark.crash
def test_two_writers_no_lock_error_no_lost_update(fresh_default: Path, tmp_path: Path) -> None:
    n = 80
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(fresh_default), str(who), str(n), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=subprocess_env(),
        )
        for who in (1, 2)
    ]
    for c in children:
        assert c.stdout is not None
        assert c.stdout.readline().strip() == "ready", c.stderr.read() if c.stderr else ""
    go.touch()
    for c in children:
        out, err = c.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert c.returncode == 0, err
        assert "locked" not in err
        assert out.strip() == "done"
    assert_sound(fresh_default)
    got = pages(fresh_default)
    assert len(got) == 2 * n
    assert sorted(got) == list(range(FIRST_PFN, FIRST_PFN + 2 * n))  # dense: nobody allocated on a stale view
    tags = sorted(blob.split(b";")[0].decode() for blob in got.values())
    assert tags == sorted(f"{who}:{seq}" for who in (1, 2) for seq in range(n))


# -- frame bytes across processes -------------------------------------------------------------------------------

FRAME_GEN = """
import random
def frame_plan(seed):
    '''[(order, [(offset, bytes), ...]), ...]: what the writer allocates and writes, in order.'''
    rng = random.Random(seed)
    plan = []
    for _ in range(48):
        order = rng.choice([0, 0, 0, 0, 1, 2, 3])
        size = 4096 << order
        writes = [(0, rng.randbytes(size))] if rng.random() < 0.5 else []
        for _ in range(rng.randrange(1, 6)):
            off = rng.randrange(size)
            writes.append((off, rng.randbytes(rng.randrange(1, size - off + 1))))
        plan.append((order, writes))
    return plan
"""

WRITE_FRAMES = (
    FRAME_GEN
    + """
import json, sys
from iommupt_store import Store
m = Store(sys.argv[1]).machine("default")
out = {}
with m.transaction() as tx:
    for order, writes in frame_plan(int(sys.argv[2])):
        pfn = tx.memory.alloc("test", order=order)
        for off, data in writes:
            tx.memory.write(pfn, data, offset=off)
        words = tx.memory.words_rw(pfn)    # and one u64 through the word view
        words[len(words) - 1] = 0xFFFF_8000_DEAD_BEEF
        out[pfn] = order
print(json.dumps(out))
"""
)

READ_FRAMES = """
import json, sys
from iommupt_store import Store
m = Store(sys.argv[1]).machine("default")
pfns = json.loads(sys.argv[2])
with m.transaction(write=False) as tx:
    print(json.dumps({p: tx.memory.read(p).hex() for p in pfns}))
"""


@pytest.mark.crash
def test_frames_are_byte_identical_across_processes(run_py: RunPy, fresh_default: Path) -> None:
    seed = 20261124
    w = run_py(WRITE_FRAMES, str(fresh_default), str(seed))
    assert w.returncode == 0, w.stderr
    layout = {int(k): v for k, v in json.loads(w.stdout).items()}

    namespace: dict[str, object] = {}
    exec(FRAME_GEN, namespace)
    expected: dict[int, bytes] = {}
    for (order, writes), pfn in zip(namespace["frame_plan"](seed), layout, strict=True):  # type: ignore[operator]
        buf = bytearray(PAGE_SIZE << order)
        for off, data in writes:
            buf[off : off + len(data)] = data
        buf[-8:] = (0xFFFF_8000_DEAD_BEEF).to_bytes(8, "little")
        assert layout[pfn] == order
        assert pfn % (1 << order) == 0
        expected[pfn] = bytes(buf)

    r = run_py(READ_FRAMES, str(fresh_default), json.dumps(list(layout)))
    assert r.returncode == 0, r.stderr
    read_back = {int(k): bytes.fromhex(v) for k, v in json.loads(r.stdout).items()}
    assert read_back == expected
    assert pages(fresh_default) == expected  # the raw BLOBs, read without our code
