"""docs/sql.md, run as a user would: every query with the stock sqlite3 shell and with psql.

The cookbook's example machine is built by its own shell block (one real
process per command: a real two-process live update), then each question's
SQL runs in the real command-line shells, and every answer is checked against
what the CLI's ``--json`` says about the same question.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iommupt_store.units import parse_number

DOC = Path(__file__).resolve().parent.parent / "docs" / "sql.md"
PG_URL = os.environ.get("IOMMUPT_TEST_PG_URL")
BIN = Path(sys.executable).parent

Row = tuple[str, ...]


# -- the document --------------------------------------------------------------------------------------
def _sections() -> dict[int, list[tuple[str, str]]]:
    """Question number -> its code blocks as (info string, code)."""
    text = DOC.read_text()
    out: dict[int, list[tuple[str, str]]] = {}
    for m in re.finditer(r"^## (\d+)\. .*?(?=^## |\Z)", text, re.S | re.M):
        out[int(m.group(1))] = re.findall(r"```([^\n]*)\n(.*?)```", m.group(0), re.S)
    return out


def _setup_script() -> str:
    text = DOC.read_text()
    block = text.split("## The example machine", 1)[1]
    return re.search(r"```sh\n(.*?)```", block, re.S).group(1)  # type: ignore[union-attr]


SECTIONS = _sections()


def _statement(number: int, dialect: str) -> tuple[str, str] | None:
    """(kind, code) to run for ``dialect``: 'sql' for a shell, 'sh' for an iommupt-store command line."""
    blocks = SECTIONS[number]
    for info, code in blocks:
        if info.split() == ["sql", dialect]:
            return "sql", code
    for info, code in blocks:
        if info.strip() == "sql":
            return "sql", code
    if dialect == "sqlite":
        for info, code in blocks:
            if info.strip() == "sh":
                return "sh", code
    return None


# -- the example machine, built by real processes ------------------------------------------------------------
def _env(db: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOMMUPT_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["IOMMUPT_DB"] = db
    return env


def _build(db: str, cwd: Path) -> None:
    script = _setup_script().replace("export IOMMUPT_DB=cookbook.db && ", "")
    r = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=_env(db), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


class World:
    """A built example machine and the ways to ask it questions."""

    def __init__(self, db: str, cwd: Path, dialect: str, shell: Callable[[str], list[Row]]) -> None:
        self.db, self.cwd, self.dialect, self.shell = db, cwd, dialect, shell

    def cli(self, *args: str) -> Any:
        r = subprocess.run(
            ["iommupt-store", *args, "--json"], cwd=self.cwd, env=_env(self.db), capture_output=True, text=True
        )
        assert r.returncode in (0, 65), r.stderr
        return json.loads(r.stdout)

    def ask(self, number: int) -> list[Row]:
        stmt = _statement(number, self.dialect)
        if stmt is None:
            pytest.skip(f"question {number} has no {self.dialect} form")
        kind, code = stmt
        if kind == "sql":
            return self.shell(code)
        # an iommupt-store command line: run it with --csv for rows
        r = subprocess.run(
            ["bash", "-e", "-c", code.replace("iommupt-store query", "iommupt-store query --csv", 1)],
            cwd=self.cwd,
            env=_env(self.db),
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        return _csv_rows(r.stdout)


def _norm(value: Any) -> str:
    if value is None or value == "":
        return ""
    if value is True or value == "t":
        return "1"
    if value is False or value == "f":
        return "0"
    return str(value)


def _csv_rows(text: str) -> list[Row]:
    rows = list(csv.reader(io.StringIO(text)))
    return [tuple(_norm(v) for v in r) for r in rows[1:]]


def _sqlite_shell(db: Path) -> Callable[[str], list[Row]]:
    def run(sql: str) -> list[Row]:
        r = subprocess.run(
            ["sqlite3", "-readonly", "-json", str(db)], input=sql, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0 and not r.stderr, r.stderr
        return [tuple(_norm(v) for v in row.values()) for row in (json.loads(r.stdout) if r.stdout.strip() else [])]

    return run


def _psql_shell(url: str) -> Callable[[str], list[Row]]:
    def run(sql: str) -> list[Row]:
        r = subprocess.run(
            ["psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--csv", "-f", "-"],
            input=sql,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        return _csv_rows(r.stdout)

    return run


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    cwd = tmp_path_factory.mktemp("cookbook")
    if request.param == "sqlite":
        if shutil.which("sqlite3") is None:
            pytest.skip("the sqlite3 shell is not installed")
        db = cwd / "cookbook.db"
        _build(str(db), cwd)
        yield World(str(db), cwd, "sqlite", _sqlite_shell(db))
        return
    if not PG_URL:
        pytest.skip("IOMMUPT_TEST_PG_URL is not set")
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed")
    psycopg = pytest.importorskip("psycopg")
    admin = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"cookbook_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base = PG_URL.rpartition("/")[0]
    url = f"{base}/{name}"
    try:
        _build(url, cwd)
        yield World(url, cwd, "postgresql", _psql_shell(url.replace("postgresql+psycopg://", "postgresql://")))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


# -- what the CLI says ---------------------------------------------------------------------------------------
def _tables(tree: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield tree
    for c in tree["children"]:
        yield from _tables(c)


def _domains(w: World) -> list[dict[str, Any]]:
    return w.cli("domains")  # type: ignore[no-any-return]


def _leaves(w: World, domain: int) -> dict[int, int]:
    return {parse_number(k): v for k, v in w.cli("show", str(domain))["leaves"].items()}


def _incoming(w: World) -> dict[int, dict[str, Any]]:
    return {int(e["token"], 16): e for e in w.cli("handover")["incoming"]}


def _translate(w: World, domain: int, iova: int) -> dict[str, Any]:
    return w.cli("translate", str(domain), hex(iova))[0]  # type: ignore[no-any-return]


def _u64(text: str) -> int:
    v = int(text, 0)
    return v + (1 << 64) if v < 0 else v


def test_every_question_is_checked() -> None:
    assert len(SECTIONS) >= 12
    assert set(SECTIONS) == set(CHECKS), "each question of docs/sql.md needs a check here"


def check_1(w: World) -> None:
    tree = w.cli("show", "2")["tree"]
    expected = sorted((str(t["pfn"]), str(t["level"]), "") for t in _tables(tree))
    assert sorted(w.ask(1)) == expected


def check_2(w: World) -> None:
    sessions = {s["name"]: s["state"] for s in w.cli("sessions")}
    assert sessions["idle"] == "finished"
    assert w.ask(2) == [("1", "1", "idle", str(_incoming(w)[0x100]["unclaimed_frames"]))]


def check_3(w: World) -> None:
    e = _incoming(w)[0x200]
    assert e["state"] == "restorable"
    assert w.ask(3) == [("1", "2", str(0x200), str(e["unclaimed_frames"]))]


def check_4(w: World) -> None:
    t = _translate(w, 5, 0x101234)
    assert w.ask(4) == [(str(int(t["phys"], 16)), str(t["page_size"]), _norm(t["readable"]), _norm(t["writable"]))]


def check_5(w: World) -> None:
    expected = [(str(d["id"]), str(n)) for d in _domains(w) if (n := _leaves(w, d["id"]).get(2 << 20))]
    assert w.ask(5) == expected


def check_6(w: World) -> None:
    expected = [(str(d["id"]), str(s), str(n)) for d in _domains(w) for s, n in sorted(_leaves(w, d["id"]).items())]
    assert w.ask(6) == expected


def check_7(w: World) -> None:
    rows = w.ask(7)
    assert {r[0] for r in rows} == {"1", "6"}
    for domain, iova, phys, _size in rows:
        t = _translate(w, int(domain), _u64(iova))
        assert (int(t["phys"], 16), t["writable"]) == (int(phys), True)


def check_8(w: World) -> None:
    rows = w.ask(8)
    assert rows == [("1", "0xffff800000000000", str(64 << 10))]
    assert _translate(w, 1, 0xFFFF800000000000)["writable"] is False


def check_9(w: World) -> None:
    expected = sorted(
        (s["name"], str(s["boot"]), s["state"])
        for s in w.cli("sessions")
        if s["state"] not in ("finished", "discarded")
    )
    assert w.ask(9) == expected


def check_10(w: World) -> None:
    expected = [
        (d["bdf"], str(d["domain"]), str(d["did"])) for d in w.cli("devices") if "previous boot" in d["attachment"]
    ]
    assert expected and w.ask(10) == expected


def check_11(w: World) -> None:
    expected = [(f"{t:#x}", e["kind"], _norm(e["restored_domain"])) for t, e in sorted(_incoming(w).items())]
    assert [(r[0], r[1], r[3]) for r in w.ask(11)] == expected


def check_12(w: World) -> None:
    tree = w.cli("show", "2")["tree"]
    expected = sorted(
        ((str(t["level"]), str(t["pfn"]), str(t["entries_used"]), "1") for t in _tables(tree)),
        key=lambda r: (-int(r[0]), int(r[1])),
    )
    assert w.ask(12) == expected


def check_13(w: World) -> None:
    expected = []
    for d in _domains(w):
        counts: dict[int, int] = {}
        for t in _tables(w.cli("show", str(d["id"]))["tree"]):
            counts[t["level"]] = counts.get(t["level"], 0) + 1
        expected += [(str(d["id"]), str(lvl), str(n)) for lvl, n in sorted(counts.items(), reverse=True)]
    assert w.ask(13) == expected


def check_14(w: World) -> None:
    expected = [(str(d["id"]), d["format"], d["state"], str(d["boot"])) for d in _domains(w)]
    assert w.ask(14) == expected


def check_15(w: World) -> None:
    assert w.cli("fsck")["ok"] is True
    assert w.ask(15) == []


def check_16(w: World) -> None:
    if w.dialect != "sqlite":
        pytest.skip("le64/pte_decode are helpers of iommupt-store query on SQLite")
    tree = w.cli("show", "5")["tree"]
    rows = w.ask(16)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    first = json.loads(rows[0][2])
    assert first["type"] == "table" and first["addr"] == tree["children"][0]["phys"]
    assert [json.loads(r[2])["type"] for r in rows[1:]] == ["empty"] * 3


def check_17(w: World) -> None:
    boots = w.cli("status")["machines"][0]["boots"]
    assert w.ask(17) == [(str(b["number"]), _norm(b["end_kind"])) for b in boots]


CHECKS: dict[int, Callable[[World], None]] = {
    int(name.split("_")[1]): fn for name, fn in dict(globals()).items() if name.startswith("check_") and callable(fn)
}


@pytest.mark.parametrize("number", sorted(CHECKS))
def test_question(world: World, number: int) -> None:
    CHECKS[number](world)
