r"""pytest plugin: live-update tests across real processes, for your own test suite.

Installed with iommupt-store and loaded by pytest through the ``pytest11`` entry point, so any project
that has iommupt-store installed gets these fixtures (``-p no:iommupt_store`` turns the plugin off):

``iommupt_db``
    A ``pathlib.Path``: a fresh SQLite store under ``tmp_path``, schema at the current revision
    (``Store.init``), no machine yet.
``iommupt_machine``
    A ``Machine`` named ``"test"`` in ``iommupt_db``, attached to boot 1 in this (the test's) process.
``iommupt_boot``
    A ``BootRunner``: runs code in a new process, which attaches to the machine's current boot. After a
    ``liveupdate`` (the kexec) that is boot N+1. Nothing crosses but database rows and the JSON passed in
    and returned.

A two-process restart test, with the test itself as the kernel of boot 1 and a child as boot 2::

    from iommupt_store.domains import domain_alloc
    from iommupt_store.liveupdate import liveupdate, preserve_domain, restore_domain
    from iommupt_store.testing import assert_translations

    def after_kexec(machine, old_id):          # module level: the child imports it
        with machine.transaction() as tx:
            dom = restore_domain(tx, 0x100)
            report = assert_translations(tx, dom.id, [(0x0, 0x100000000, 2 << 20)])
            return report.summary.translations

    def test_dma_survives(iommupt_machine, iommupt_boot):
        with iommupt_machine.transaction() as tx:
            dom = domain_alloc(tx, "x86_64")
            dom.map_range(0x0, 0x100000000, 2 << 20)
            preserve_domain(tx, dom.id, 0x100)
        liveupdate(iommupt_machine)                            # boot 1 ends here
        assert iommupt_boot.run(after_kexec, dom.id, expect_boot=2) == 512

``assert_translations(machine_or_tx, domain_id, runs=None)`` checks every translation of a domain
(``iommupt_store.verify.verify_domain``, walking its frames as the IOMMU would) against ``runs`` --
``(iova, phys, length)`` or ``(iova, phys, length, prot)`` tuples, dicts with those keys or
``ExpectedRun`` objects, in ascending IOVA order; ``prot`` is ``Prot`` bits or letters such as ``"rw"``
(the default) -- or, without ``runs``, against the mapping runs recorded for the domain. It fails with
the differing runs listed (missing, unexpected, wrong phys, wrong permissions) and otherwise returns
the ``VerifyReport``. Given a ``Machine`` it reads in a read-only transaction of its own.

``iommupt_boot.run(func, *args)`` calls ``func(machine, *args)`` in the child, ``machine`` being attached
to the current boot there, and returns what ``func`` returned. ``func`` must be a module-level function
(the child imports its module, from the parent's ``sys.path`` or else from the module's file; asserts
in it are rewritten by pytest as in your tests); ``args`` and the return value must be
JSON-serializable (tuples arrive as lists). Each call is a new process, so both phases can be children
too: ``iommupt_boot.run(build)`` (boot 1, ends with ``liveupdate``) then ``iommupt_boot.run(check)``
(boot 2). When the child fails (an exception, a non-JSON return value, a wrong ``expect_boot``, a
timeout, any non-zero exit), ``run`` raises ``BootFailed`` (an ``AssertionError``) whose message holds
the child's exception and traceback; its ``stdout`` and ``stderr`` are kept as attributes, and what a
successful child printed is replayed into the test's captured output.

Other methods: ``iommupt_boot.crash(func, *args, at="seal")`` runs the child with
``IOMMUPT_CRASHPOINT=seal`` and checks that it died by SIGKILL there (``"seal:2"``: the second time
that point is reached); ``iommupt_boot.run_script(path_or_source, *argv)`` runs a script (a ``Path``)
or Python source (a ``str``) with ``$IOMMUPT_DB`` and ``$IOMMUPT_MACHINE`` set, as does every child.
The crash points of this version: ``before_commit`` (every write transaction), ``boot_start``,
``boot_start_hook``, ``preserve``, ``unpreserve``, ``seal``, ``restore``, ``session_close``,
``session_retrieve``, ``session_finish``, ``device_replace``.

Settings (``pytest.ini``/``pyproject.toml``): ``iommupt_mem`` is the machine's memory (default ``4G``;
``K``/``M``/``G``/``T`` suffixes, or bytes), ``iommupt_timeout`` the seconds a child may take (default
60; ``timeout=`` per call). ``@pytest.mark.iommupt(mem="64M")`` sets the memory for one test. Children
get the test process's environment without its ``IOMMUPT_*`` variables, and its working directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .machine import Machine, Transaction
    from .verify import ExpectedRun, VerifyReport

__all__ = ["MACHINE_NAME", "BootFailed", "BootRunner", "assert_translations"]

#: the name of the machine the fixtures create
MACHINE_NAME = "test"
DEFAULT_MEM = "4G"
DEFAULT_TIMEOUT = 60.0
ENV_DB = "IOMMUPT_DB"
ENV_MACHINE = "IOMMUPT_MACHINE"
ENV_CRASHPOINT = "IOMMUPT_CRASHPOINT"
#: how much of a failed child's stderr goes into the failure message
_STDERR_TAIL = 8000


# ============================================================================================ pytest hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("iommupt_mem", "memory of the iommupt_machine fixture's machine (e.g. 4G, 64M)", default=DEFAULT_MEM)
    parser.addini("iommupt_timeout", "seconds an iommupt_boot child process may run", default=str(DEFAULT_TIMEOUT))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "iommupt(mem='4G'): the memory of this test's iommupt machine")


# ============================================================================================ fixtures


@pytest.fixture(scope="session")
def _iommupt_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated database per session; every test gets a copy (migrating is the slow part)."""
    from .store import Store

    path = tmp_path_factory.mktemp("iommupt-template") / "template.db"
    Store.init(path).close()
    return path


@pytest.fixture
def iommupt_db(tmp_path: Path, _iommupt_template: Path) -> Path:
    """A fresh SQLite store (schema at the current revision, no machine) at ``tmp_path / "iommupt.db"``."""
    import sqlite3

    path = tmp_path / "iommupt.db"
    src, dst = sqlite3.connect(_iommupt_template), sqlite3.connect(path)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    path.chmod(0o600)
    return path


@pytest.fixture
def _iommupt_machine_name(request: pytest.FixtureRequest, iommupt_db: Path) -> str:
    """Creates the machine (no boot yet: the first process to attach starts boot 1)."""
    from .store import Store

    marker = request.node.get_closest_marker("iommupt")
    text = marker.kwargs.get("mem") if marker else None
    mem = _parse_size(str(text if text is not None else request.config.getini("iommupt_mem")))
    with Store(iommupt_db) as store:
        store.create_machine(MACHINE_NAME, mem)
    return MACHINE_NAME


@pytest.fixture
def iommupt_machine(iommupt_db: Path, _iommupt_machine_name: str) -> Iterator[Machine]:
    """The machine ``"test"`` in ``iommupt_db``, attached to boot 1 in the test's process."""
    from .store import Store

    store = Store(iommupt_db)
    try:
        yield store.machine(_iommupt_machine_name)
    finally:
        store.close()


@pytest.fixture
def iommupt_boot(request: pytest.FixtureRequest, iommupt_db: Path, _iommupt_machine_name: str) -> BootRunner:
    """Runs code in new processes on the test's machine: see ``BootRunner``."""
    timeout = float(request.config.getini("iommupt_timeout"))
    return BootRunner(iommupt_db, _iommupt_machine_name, timeout=timeout)


# ============================================================================================ checking translations


def assert_translations(
    machine_or_tx: Machine | Transaction,
    domain_id: int,
    runs: Iterable[ExpectedRun | Mapping[str, Any] | Sequence[Any]] | None = None,
    *,
    max_differences: int = 10,
) -> VerifyReport:
    """Every translation of ``domain_id`` must be ``runs`` (or the recorded mapping runs): see the module doc."""
    from .machine import Machine
    from .verify import ExpectedRun, verify_domain

    expect = None
    if runs is not None:
        expect = []
        for run in runs:
            if isinstance(run, ExpectedRun):
                expect.append(run)
            elif isinstance(run, Mapping):
                expect.append(ExpectedRun.model_validate(dict(run)))
            else:
                expect.append(ExpectedRun(**dict(zip(("iova", "phys", "length", "prot"), run, strict=False))))
    if isinstance(machine_or_tx, Machine):
        with machine_or_tx.transaction(write=False) as tx:
            report = verify_domain(tx, domain_id, expect, max_differences=max_differences)
    else:
        report = verify_domain(machine_or_tx, domain_id, expect, max_differences=max_differences)
    if not report.ok:
        lines = [
            f"domain {domain_id}: {report.differences_total} run(s) translate otherwise than {report.against}:",
            *(
                f"  {d.kind} [{d.iova:#x}, +{d.length:#x}): expected "
                + ("nothing" if d.expected_phys is None else f"{d.expected_phys:#x} {d.expected_prot}")
                + ", found "
                + ("nothing" if d.found_phys is None else f"{d.found_phys:#x} {d.found_prot}")
                for d in report.differences
            ),
        ]
        if report.differences_total > len(report.differences):
            lines.append(f"  ... and {report.differences_total - len(report.differences)} more")
        raise AssertionError("\n".join(lines))
    return report


# ============================================================================================ the runner


class BootFailed(AssertionError):
    """A child process of ``BootRunner`` failed; the message holds its error and traceback."""

    def __init__(self, message: str, *, returncode: int | None, stdout: str, stderr: str, boot: int | None) -> None:
        super().__init__(message)
        #: the child's exit status (negative: killed by that signal; None: timed out)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        #: the boot the child attached to (None if it failed before attaching)
        self.boot = boot


class BootRunner:
    """Runs code in new processes, each a kernel of its own on one machine of one store.

    A process attaches to the machine's current boot, starting boot N+1 if boot N has ended (after
    ``liveupdate`` or a cold reboot). Its exit is the end of that kernel: nothing it held in memory
    survives, only what it committed to the database.
    """

    def __init__(self, db: Path, machine: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.db = db
        self.machine = machine
        self.timeout = timeout
        #: the boot the last child attached to
        self.last_boot: int | None = None

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A child's environment: ours without ``IOMMUPT_*``, with the store, the machine and our
        ``sys.path`` (what is not the interpreter's own) on ``PYTHONPATH``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOMMUPT_")}
        env[ENV_DB] = str(self.db)
        env[ENV_MACHINE] = self.machine
        env["PYTHONPATH"] = os.pathsep.join(_child_path(env.get("PYTHONPATH")))
        env.update(extra or {})
        return env

    def run(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        expect_boot: int | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Any:
        """``func(machine, *args)`` in a new process; returns its (JSON) return value.

        ``expect_boot``: fail unless the child attaches to that boot (e.g. 2 after boot 1's liveupdate).
        Raises ``BootFailed`` if the child fails in any way.
        """
        __tracebackhide__ = True
        proc, result, name = self._spawn(func, args, expect_boot, timeout, env)
        if proc.returncode != 0 or "value" not in result:
            raise self._failure(name, proc, result)
        _replay(proc, result.get("boot"))
        return result["value"]

    def crash(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        at: str,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> int | None:
        """``func(machine, *args)`` in a new process that must die by SIGKILL at crash point ``at``.

        ``at`` is a crash point name, or ``name:n`` for its n-th hit. Returns the boot the child had
        attached to (None if it died while attaching, e.g. at ``boot_start``). Raises ``BootFailed``
        if the child finished or failed otherwise.
        """
        __tracebackhide__ = True
        proc, result, name = self._spawn(func, args, None, timeout, {**(env or {}), ENV_CRASHPOINT: at})
        if proc.returncode != -signal.SIGKILL:
            raise self._failure(f"{name} with {ENV_CRASHPOINT}={at}", proc, result, "never reached the crash point")
        boot: int | None = result.get("boot")
        return boot

    def run_script(
        self,
        script: str | os.PathLike[str],
        /,
        *argv: str,
        check: bool = True,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a script file (a path) or Python source (a ``str``) with ``argv`` in a new process.

        The script finds the store in ``$IOMMUPT_DB`` and the machine's name in ``$IOMMUPT_MACHINE``
        (``iommupt_store.open(machine=os.environ["IOMMUPT_MACHINE"])``; the ``iommupt-store`` command
        reads both). With ``check`` (the default) a non-zero exit raises ``BootFailed``.
        """
        __tracebackhide__ = True
        cmd = [str(script)] if isinstance(script, os.PathLike) else ["-c", script]
        name = f"script {script}" if isinstance(script, os.PathLike) else "script"
        proc = self._popen([*cmd, *argv], timeout, env, name)
        if check and proc.returncode != 0:
            raise self._failure(name, proc, {})
        _replay(proc, None)
        return proc

    # -- internals ------------------------------------------------------------------------------------
    def _spawn(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        expect_boot: int | None,
        timeout: float | None,
        env: Mapping[str, str] | None,
    ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], str]:
        __tracebackhide__ = True
        module, qualname, file = _locate(func)
        name = f"{module}.{qualname}"
        spec = {
            "module": module,
            "qualname": qualname,
            "file": file,
            "args": list(args),
            "db": str(self.db),
            "machine": self.machine,
            "expect_boot": expect_boot,
        }
        try:
            encoded = json.dumps(spec)
        except (TypeError, ValueError) as e:
            raise TypeError(f"the arguments for {name} must be JSON-serializable: {e}") from None
        with tempfile.TemporaryDirectory(prefix="iommupt-boot-") as tmp:
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(encoded)
            code = "import sys; from iommupt_store.testing import _child_main; sys.exit(_child_main(sys.argv[1]))"
            proc = self._popen(["-c", code, str(spec_path)], timeout, env, name)
            result_path = Path(tmp) / "result.json"
            result: dict[str, Any] = json.loads(result_path.read_text()) if result_path.exists() else {}
        self.last_boot = result.get("boot")
        return proc, result, name

    def _popen(
        self, args: list[str], timeout: float | None, env: Mapping[str, str] | None, name: str
    ) -> subprocess.CompletedProcess[str]:
        __tracebackhide__ = True
        limit = self.timeout if timeout is None else timeout
        try:
            return subprocess.run(
                [sys.executable, *args],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                env=self.env(env),
                timeout=limit,
            )
        except subprocess.TimeoutExpired as e:
            out, err = _text(e.stdout), _text(e.stderr)
            msg = f"{name}: the child process did not finish within {limit:g} s and was killed"
            raise BootFailed(
                f"{msg}\n{_section('stderr', err)}", returncode=None, stdout=out, stderr=err, boot=None
            ) from None

    def _failure(
        self, name: str, proc: subprocess.CompletedProcess[str], result: dict[str, Any], what: str = "failed"
    ) -> BootFailed:
        boot = result.get("boot")
        where = f" in boot {boot}" if boot is not None else ""
        rc = proc.returncode
        status = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        lines = [f"{name}: the child process {what}{where} ({status})"]
        if result.get("error"):
            lines.append(str(result["error"]))
        lines.append(_section("stderr", proc.stderr))
        if proc.stdout.strip():
            lines.append(_section("stdout", proc.stdout))
        return BootFailed("\n".join(lines), returncode=rc, stdout=proc.stdout, stderr=proc.stderr, boot=boot)


# ============================================================================================ helpers


def _parse_size(text: str) -> int:
    """``4G``, ``64M``, ``0x100000``, ``1GiB`` ... as bytes: the command line's own parser."""
    from .errors import InvalidArgument
    from .units import parse_number

    try:
        return parse_number(text)
    except InvalidArgument as e:
        raise pytest.UsageError(f"iommupt: bad memory size: {e.args[0]}") from None


def _locate(func: Callable[..., Any]) -> tuple[str, str, str | None]:
    """(module, qualname, file) of a module-level function the child can import."""
    __tracebackhide__ = True
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not callable(func) or not module or not qualname or "<" in qualname or module == "__main__":
        raise TypeError(
            f"{func!r} cannot run in a child process: pass a function defined at module level "
            "(not a lambda, a nested function or one from __main__); the child imports it by name"
        )
    mod = sys.modules.get(module)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if obj is not func:
        raise TypeError(f"{module}.{qualname} does not name {func!r}: the child could not import it")
    file = getattr(mod, "__file__", None)
    return module, qualname, str(file) if file else None


def _child_path(existing: str | None) -> list[str]:
    """Our ``sys.path`` minus the interpreter's own directories (the child has those), then ``existing``."""
    import site
    import sysconfig

    own = {os.path.realpath(p) for p in sysconfig.get_paths().values()}
    own.update(os.path.realpath(p) for p in site.getsitepackages())
    own.add(os.path.realpath(site.getusersitepackages()))
    paths = [os.path.abspath(p or os.curdir) for p in sys.path]
    paths = [p for p in dict.fromkeys(paths) if os.path.isdir(p) and os.path.realpath(p) not in own]
    return [*paths, *([existing] if existing else [])]


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def _section(title: str, text: str) -> str:
    text = text.rstrip()
    if len(text) > _STDERR_TAIL:
        text = "[...]\n" + text[-_STDERR_TAIL:]
    return f"--- child {title} ---\n{text}" if text else f"--- child {title}: (empty) ---"


def _replay(proc: subprocess.CompletedProcess[str], boot: int | None) -> None:
    """What a successful child printed, into the test's (captured) output."""
    label = f"boot {boot} child" if boot is not None else "child"
    if proc.stdout:
        sys.stdout.write(f"--- {label} stdout ---\n{proc.stdout}")
    if proc.stderr:
        sys.stderr.write(f"--- {label} stderr ---\n{proc.stderr}")


# ============================================================================================ the child


def _child_main(spec_path: str) -> int:
    """Runs in the child: import the function, attach, call it, write the result next to the spec."""
    import traceback

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec_path).with_name("result.json")
    result: dict[str, Any] = {}

    def write() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out)

    name = f"{spec['module']}.{spec['qualname']}"
    stage = f"importing {name}"
    try:
        func = _child_import(spec["module"], spec["qualname"], spec["file"])
        stage = f"opening machine {spec['machine']!r}"
        from .store import Store

        machine = Store(spec["db"]).machine(spec["machine"])
        result["boot"] = machine.boot_number
        write()
        expect = spec["expect_boot"]
        stage = "checking expect_boot"
        if expect is not None and machine.boot_number != expect:
            hint = " (did the previous kernel end with liveupdate?)" if machine.boot_number < expect else ""
            raise AssertionError(f"expected to attach to boot {expect}, attached to boot {machine.boot_number}{hint}")
        stage = f"calling {name}"
        value = func(machine, *spec["args"])
        stage = f"returning from {name}"
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} returned a value that is not JSON-serializable: {e}") from None
        result["value"] = value
        write()
        machine.store.close()
        return 0
    except BaseException as e:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        sys.stderr.write(f"{stage} failed:\n")
        traceback.print_exception(type(e), e, tb)
        summary = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
        result["error"] = f"{stage}: {summary[0] if summary else type(e).__name__}"
        write()
        return 1


def _child_import(module: str, qualname: str, file: str | None) -> Any:
    """Load ``module`` from its file under its own name (asserts rewritten as pytest does), or import it
    by name when it has no file; return ``qualname`` in it."""
    import importlib
    import importlib.util

    spec = importlib.util.spec_from_file_location(module, file) if file else None
    if spec is None or spec.loader is None:
        mod: Any = importlib.import_module(module)
    else:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        if not (file and file.endswith(".py") and _exec_rewritten(mod, file)):
            spec.loader.exec_module(mod)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _exec_rewritten(mod: Any, path: str) -> bool:
    """Execute the module's source with pytest's assertion rewriting; False if that is not possible."""
    import ast

    try:
        from _pytest.assertion.rewrite import rewrite_asserts
    except ImportError:  # pragma: no cover - a pytest without it
        return False
    source = Path(path).read_bytes()
    tree = ast.parse(source, filename=path)
    rewrite_asserts(tree, source, path)
    exec(compile(tree, path, "exec", dont_inherit=True), mod.__dict__)
    return True
