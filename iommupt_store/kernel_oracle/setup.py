"""Setting the oracle up once: the kernel from Debian's archive, our guest program, busybox.

The kernel packages are fetched by exact version with a private apt configuration (its own sources
file, lists and cache inside the cache directory), so the machine's apt sources stay untouched.
QEMU and busybox come from the machine's own packages; QEMU 10 (for Intel first-stage tables) is
fetched the same way, on request, and unpacked into the cache.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .qemu import OracleError, OracleUnavailable, qemu_binary

KERNEL_ABI = "7.3.4+deb13-amd64"
KERNEL_VERSION = "7.3.4-1~bpo13+1"
#: where the Debian archive is: ``$IOMMUPT_ORACLE_ARCHIVE``, else the first Debian mirror the machine's
#: own apt sources name (read, never changed)
ARCHIVE_ENV = "IOMMUPT_ORACLE_ARCHIVE"
SUITE = "trixie-backports"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PACKAGES = (f"linux-binary-{KERNEL_ABI}", f"linux-modules-{KERNEL_ABI}")
#: the VFIO modules, in load order, and where the modules package keeps them
MODULES = {
    "irqbypass": "virt/lib/irqbypass.ko.xz",
    "vfio": "drivers/vfio/vfio.ko.xz",
    "vfio_iommu_type1": "drivers/vfio/vfio_iommu_type1.ko.xz",
    "vfio-pci-core": "drivers/vfio/pci/vfio-pci-core.ko.xz",
    "vfio-pci": "drivers/vfio/pci/vfio-pci.ko.xz",
}
#: QEMU 10 from trixie, for Intel first-stage tables (QEMU 7.2 cannot emulate them); it runs with
#: trixie's own loader and libraries, unpacked next to it, so nothing of the machine changes
QEMU10_SUITE = "trixie"
QEMU10_VERSION = "1:10.0.13+ds-0+deb13u1"
BUSYBOX = Path("/bin/busybox")
CACHE_ENV = "IOMMUPT_ORACLE_CACHE"


def default_cache() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iommupt-store" / "kernel-oracle"


@dataclass(frozen=True)
class OracleFiles:
    """A ready cache directory."""

    root: Path

    @property
    def kernel(self) -> Path:
        return self.root / "kernel" / "vmlinuz"

    @property
    def guest(self) -> Path:
        return self.root / "guest" / "oracle_guest"

    @property
    def busybox(self) -> Path:
        return BUSYBOX

    def module(self, name: str) -> Path:
        return self.root / "kernel" / "modules" / f"{name}.ko"

    @property
    def manifest(self) -> Path:
        return self.root / "ready.json"

    @property
    def qemu10_root(self) -> Path:
        return self.root / "qemu10"

    @property
    def qemu10_binary(self) -> Path:
        return self.qemu10_root / "usr" / "bin" / "qemu-system-x86_64"

    def qemu(self, vendor: str) -> list[str] | None:
        """The QEMU command for ``vendor``: None for the machine's own, else QEMU 10 from the cache."""
        if vendor != "intel-fs":
            return None
        root = self.qemu10_root
        if not self.qemu10_binary.exists():
            raise OracleUnavailable(
                "Intel first stage needs QEMU 10: run python -m iommupt_store.kernel_oracle setup --with-qemu10"
            )
        libs = root / "usr" / "lib" / "x86_64-linux-gnu"
        return [
            str(root / "usr" / "lib64" / "ld-linux-x86-64.so.2"),
            *("--library-path", str(libs)),
            str(self.qemu10_binary),
            *("-L", str(root / "usr" / "share" / "qemu")),
        ]


def ready(cache: Path) -> OracleFiles:
    """The cache's files if ``setup`` completed for this version; OracleUnavailable otherwise."""
    files = OracleFiles(cache)
    try:
        manifest = json.loads(files.manifest.read_text())
    except (OSError, ValueError):
        raise OracleUnavailable(
            f"the kernel oracle is not set up in {cache} (run: python -m iommupt_store.kernel_oracle setup)"
        ) from None
    if manifest.get("kernel") != KERNEL_VERSION:
        raise OracleUnavailable(f"{cache} holds kernel {manifest.get('kernel')!r}, not {KERNEL_VERSION}: run setup")
    check_host()
    return files


def check_host() -> None:
    """QEMU and a static busybox must be installed."""
    qemu_binary()
    if not BUSYBOX.exists():
        raise OracleUnavailable("busybox is not installed (Debian: apt-get install busybox-static)")
    if _dynamic(BUSYBOX):
        raise OracleUnavailable(f"{BUSYBOX} is linked dynamically: install busybox-static")


def _dynamic(path: Path) -> bool:
    """True when the ELF file asks for a program interpreter (PT_INTERP)."""
    head = path.read_bytes()
    if head[:4] != b"\x7fELF" or head[4] != 2:
        return True
    (phoff,) = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    return any(struct.unpack_from("<I", head, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    except FileNotFoundError:
        raise OracleUnavailable(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise OracleUnavailable(f"{what}: timed out") from None
    if proc.returncode:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise OracleUnavailable(f"{what} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def debian_archive() -> str:
    """The Debian archive to fetch from: the environment's choice, else the machine's own mirror."""
    chosen = os.environ.get(ARCHIVE_ENV)
    if chosen:
        return chosen.rstrip("/")
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            uris = words[1:] if words[:1] == ["URIs:"] else [w for w in words[1:] if "://" in w][:1]
            if words[:1] in (["deb"], ["URIs:"]):
                for uri in uris:
                    if "://" in uri and uri.rstrip("/").endswith("/debian"):
                        return uri.rstrip("/")
    raise OracleUnavailable(
        f"no Debian archive found in the machine's apt sources: set ${ARCHIVE_ENV} to a Debian mirror's URL"
    )


def _private_apt(root: Path, suite: str) -> list[str]:
    """apt options for a configuration of its own under ``root`` naming only ``suite``; runs its update.

    An empty package status makes apt resolve every dependency, as for an empty machine."""
    for d in ("lists/partial", "cache/archives/partial"):
        (root / d).mkdir(parents=True, exist_ok=True)
    sources, status = root / "sources.list", root / "status"
    archive = debian_archive()
    sources.write_text(f"deb [signed-by={KEYRING}] {archive} {suite} main\n")
    status.touch()
    opts = [
        f"-oDir::Etc::sourcelist={sources}",
        "-oDir::Etc::sourceparts=-",
        f"-oDir::State::Lists={root / 'lists'}",
        f"-oDir::State::status={status}",
        f"-oDir::Cache={root / 'cache'}",
        "-oAPT::Sandbox::User=root",
        "-oAPT::Install-Recommends=0",
        "-oDebug::NoLocking=1",
        "-qq",
    ]
    _run(["apt-get", *opts, "update"], f"apt-get update of {suite} (is {archive} reachable?)")
    return opts


def _download_and_unpack(opts: list[str], wanted: list[str], dest: Path, work: Path) -> None:
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", *opts, "download", *wanted], f"download of {', '.join(wanted[:3])}...", cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(dest)], f"unpacking {deb.name}")
        deb.unlink()


def _fetch_kernel(cache: Path, log: list[str]) -> None:
    opts = _private_apt(cache / "apt", SUITE)
    wanted = [f"{p}={KERNEL_VERSION}" for p in PACKAGES]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _download_and_unpack(opts, wanted, Path(tmp), cache / "apt")
        log.append(f"downloaded {', '.join(wanted)} from {debian_archive()} {SUITE}")
        tree = Path(tmp) / "usr" / "lib" / "modules" / KERNEL_ABI
        kernel_dir = cache / "kernel" / "modules"
        kernel_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree / "vmlinuz", cache / "kernel" / "vmlinuz")
        for name, rel in MODULES.items():
            (kernel_dir / f"{name}.ko").write_bytes(lzma.decompress((tree / "kernel" / rel).read_bytes()))


def _fetch_qemu10(cache: Path, log: list[str]) -> None:
    opts = _private_apt(cache / "apt-trixie", QEMU10_SUITE)
    # the whole dependency closure as an empty machine would install it, by exact versions
    uris = _run(["apt-get", *opts, "--print-uris", "install", f"qemu-system-x86={QEMU10_VERSION}"], "resolving QEMU 10")
    wanted = []
    for line in uris.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].endswith(".deb"):
            name, version, _ = fields[1].split("_", 2)
            wanted.append(f"{name}={version.replace('%3a', ':')}")
    if not wanted:
        raise OracleUnavailable(f"qemu-system-x86 {QEMU10_VERSION} is not in {QEMU10_SUITE}")
    root = OracleFiles(cache).qemu10_root
    partial = root.with_name(root.name + ".partial")  # renamed only when complete
    shutil.rmtree(partial, ignore_errors=True)
    _download_and_unpack(opts, wanted, partial, cache / "apt-trixie")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    log.append(f"unpacked QEMU {QEMU10_VERSION} and {len(wanted) - 1} packages it needs from {QEMU10_SUITE}")


def _build_guest(cache: Path, log: list[str]) -> None:
    src = resources.files(__package__) / "guest" / "oracle_guest.c"
    out = OracleFiles(cache).guest
    out.parent.mkdir(parents=True, exist_ok=True)
    with resources.as_file(src) as path:
        _run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(path)], "building the guest program (gcc -static)")
    log.append(f"built {out}")


def setup(cache: Path, *, qemu10: bool = False) -> list[str]:
    """Fill ``cache`` (once: what is there is kept); returns what was done.

    ``qemu10`` also fetches QEMU 10 for Intel first-stage tables (about 40 MB)."""
    log: list[str] = []
    check_host()
    cache.mkdir(parents=True, exist_ok=True)
    files = OracleFiles(cache)
    try:
        ready(cache)
    except OracleUnavailable:
        if not (files.kernel.exists() and all(files.module(m).exists() for m in MODULES)):
            _fetch_kernel(cache, log)
        _build_guest(cache, log)
        files.manifest.write_text(json.dumps({"kernel": KERNEL_VERSION, "abi": KERNEL_ABI, "suite": SUITE}) + "\n")
    if qemu10 and not files.qemu10_binary.exists():
        _fetch_qemu10(cache, log)
    return log or [f"already set up in {cache}"]


__all__ = ["KERNEL_ABI", "KERNEL_VERSION", "OracleError", "OracleFiles", "default_cache", "ready", "setup"]
