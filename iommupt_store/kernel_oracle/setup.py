"""Setting the oracle up once: the kernel from Debian's archive, our guest program, busybox.

The kernel packages are fetched by exact version with a private apt configuration (its own sources
file, lists and cache inside the cache directory), so the machine's apt sources stay untouched.
QEMU and busybox come from the machine's own packages.
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
ARCHIVE = "http://deb.debian.org/debian"
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


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    except FileNotFoundError:
        raise OracleUnavailable(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise OracleUnavailable(f"{what}: timed out") from None
    if proc.returncode:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise OracleUnavailable(f"{what} failed: {detail[-1] if detail else proc.returncode}")


def _fetch_kernel(cache: Path, log: list[str]) -> None:
    apt = cache / "apt"
    for d in ("lists/partial", "cache/archives/partial"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text(f"deb [signed-by={KEYRING}] {ARCHIVE} {SUITE} main\n")
    opts = [
        f"-oDir::Etc::sourcelist={sources}",
        "-oDir::Etc::sourceparts=-",
        f"-oDir::State::Lists={apt / 'lists'}",
        f"-oDir::Cache={apt / 'cache'}",
        "-oAPT::Sandbox::User=root",
        "-oDebug::NoLocking=1",
        "-qq",
    ]
    _run(["apt-get", *opts, "update"], f"apt-get update of {SUITE} (is {ARCHIVE} reachable?)")
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    wanted = [f"{p}={KERNEL_VERSION}" for p in PACKAGES]
    _run(["apt-get", *opts, "download", *wanted], f"download of {', '.join(wanted)}", cwd=debs)
    log.append(f"downloaded {', '.join(wanted)} from {ARCHIVE} {SUITE}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), tmp], f"unpacking {deb.name}")
        tree = Path(tmp) / "usr" / "lib" / "modules" / KERNEL_ABI
        kernel_dir = cache / "kernel" / "modules"
        kernel_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree / "vmlinuz", cache / "kernel" / "vmlinuz")
        for name, rel in MODULES.items():
            (kernel_dir / f"{name}.ko").write_bytes(lzma.decompress((tree / "kernel" / rel).read_bytes()))
    for deb in debs.glob("*.deb"):
        deb.unlink()  # unpacked what we need: 120 MB less in the cache


def _build_guest(cache: Path, log: list[str]) -> None:
    src = resources.files(__package__) / "guest" / "oracle_guest.c"
    out = OracleFiles(cache).guest
    out.parent.mkdir(parents=True, exist_ok=True)
    with resources.as_file(src) as path:
        _run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(path)], "building the guest program (gcc -static)")
    log.append(f"built {out}")


def setup(cache: Path) -> list[str]:
    """Fill ``cache`` (once: a ready cache is left alone); returns what was done."""
    log: list[str] = []
    check_host()
    cache.mkdir(parents=True, exist_ok=True)
    files = OracleFiles(cache)
    try:
        ready(cache)
        return [f"already set up in {cache}"]
    except OracleUnavailable:
        pass
    if not (files.kernel.exists() and all(files.module(m).exists() for m in MODULES)):
        _fetch_kernel(cache, log)
    _build_guest(cache, log)
    files.manifest.write_text(json.dumps({"kernel": KERNEL_VERSION, "abi": KERNEL_ABI, "suite": SUITE}) + "\n")
    return log


__all__ = ["KERNEL_ABI", "KERNEL_VERSION", "OracleError", "OracleFiles", "default_cache", "ready", "setup"]
