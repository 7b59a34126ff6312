"""One guest boot under qemu-system-x86_64 (TCG): its monitor and its control channel.

The guest's console goes to a log file; a second serial port, a unix socket on the host, carries the
guest program's records and the host's "go on" after each dump. The HMP monitor reads the IOMMU's
registers and guest memory.
"""

from __future__ import annotations

import errno as _errno
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import IommuptError

#: where the guest sees the device it maps DMA for (bus 0, slot 3: devfn 0x18)
DEVICE_BDF = "0000:00:03.0"
DEVICE_DEVFN = 0x18
#: QEMU's device options per vendor: Intel second stage (legacy mode), AMD v1 tables
IOMMU_DEVICE = {
    "intel": "intel-iommu,intremap=off,aw-bits=48",
    "amd": "amd-iommu,intremap=off",
    # Intel first stage: scalable mode with first-stage translation (QEMU 10 or newer)
    "intel-fs": "intel-iommu,intremap=off,aw-bits=48,x-scalable-mode=on,x-flts=on",
}
#: seconds the guest may stay silent (booting, or one scenario's calls) before we give up on it
IDLE_TIMEOUT = 240.0
_PROMPT = b"(qemu) "


class OracleError(IommuptError):
    """The oracle could not do its work (no QEMU, the guest failed, a timeout)."""


class OracleUnavailable(OracleError):
    """A prerequisite is missing on this machine: tests skip on this, loudly."""

    errno = _errno.ENOENT


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise OracleUnavailable("qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)")
    return path


@dataclass
class GuestFiles:
    kernel: Path
    initrd: Path
    workdir: Path


class Guest:
    """A running guest: ``lines()`` yields its records, ``monitor()`` runs HMP commands."""

    def __init__(self, files: GuestFiles, vendor: str, *, qemu: list[str] | None = None, mem_mib: int = 512) -> None:
        if vendor not in IOMMU_DEVICE:
            raise OracleError(f"unknown vendor {vendor!r} ({', '.join(IOMMU_DEVICE)})")
        self.files = files
        self.console = files.workdir / "console.log"
        mon, ctl = files.workdir / "monitor.sock", files.workdir / "control.sock"
        append = "console=ttyS0 iommu.passthrough=0 quiet loglevel=4"
        if vendor.startswith("intel"):
            append += " intel_iommu=on"
        cmd = [
            *(qemu or [qemu_binary()]),
            *("-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"),
            *("-m", str(mem_mib), "-display", "none", "-vga", "none", "-no-reboot", "-nodefaults"),
            *("-serial", f"file:{self.console}", "-serial", f"unix:{ctl},server=on,wait=off"),
            *("-monitor", f"unix:{mon},server=on,wait=off"),
            *("-device", IOMMU_DEVICE[vendor], "-device", f"e1000,addr={DEVICE_DEVFN >> 3:x}.0"),
            *("-kernel", str(files.kernel), "-initrd", str(files.initrd), "-append", append),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            self._mon = self._connect(mon)
            self._ctl = self._connect(ctl)
            self._read_until(self._mon, _PROMPT)
        except BaseException:
            self.proc.kill()
            self.close()
            raise
        self._ctl_buf = b""

    def _connect(self, path: Path) -> socket.socket:
        deadline = time.monotonic() + IDLE_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace").strip() if self.proc.stdout else ""
                raise OracleUnavailable(f"QEMU exited at start (status {self.proc.returncode}): {out[-300:]}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return s
            except OSError:
                s.close()
            if time.monotonic() > deadline:
                raise OracleError(f"QEMU did not open {path.name}")
            time.sleep(0.05)

    def _read_until(self, sock: socket.socket, marker: bytes, buf: bytes = b"") -> tuple[bytes, bytes]:
        deadline = time.monotonic() + IDLE_TIMEOUT
        while marker not in buf:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise OracleError(f"the guest timed out; its console ended: {self.console_tail()}") from None
            if not chunk:
                raise OracleError(f"the guest went away; its console ended: {self.console_tail()}")
            buf += chunk
        head, _, rest = buf.partition(marker)
        return head, rest

    def console_tail(self, lines: int = 3) -> str:
        """The console's last lines, on one line (errors stay one line)."""
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    def lines(self) -> Iterator[str]:
        """The guest program's records, one line at a time, until ``done``."""
        while True:
            line, self._ctl_buf = self._read_until(self._ctl, b"\n", self._ctl_buf)
            text = line.decode(errors="replace").strip()
            if text.startswith("fatal "):
                raise OracleError(f"the guest program failed ({text}); its console ended: {self.console_tail()}")
            yield text
            if text == "done":
                return

    def resume(self) -> None:
        self._ctl.sendall(b"go\n")

    def monitor(self, command: str) -> str:
        self._mon.sendall(command.encode() + b"\n")
        out, _ = self._read_until(self._mon, _PROMPT)
        # HMP echoes the command (with terminal escapes) before its output
        text = re.sub(rb"\x1b\[[0-9;]*[A-Za-z]", b"", out).decode(errors="replace")
        return "\n".join(text.splitlines()[1:])

    def read_u64(self, phys: int) -> int:
        out = self.monitor(f"xp /1gx {phys:#x}")
        m = re.search(r":\s*0x([0-9a-fA-F]+)", out)
        if m is None:
            raise OracleError(f"unexpected monitor output for xp {phys:#x}: {out!r}")
        return int(m.group(1), 16)

    def read_page(self, phys: int) -> bytes:
        dest = self.files.workdir / "page.bin"
        self.monitor(f'pmemsave {phys:#x} 4096 "{dest}"')
        data = dest.read_bytes()
        if len(data) != 4096:
            raise OracleError(f"pmemsave of {phys:#x} gave {len(data)} bytes")
        return data

    def close(self) -> None:
        for s in ("_mon", "_ctl"):
            sock = getattr(self, s, None)
            if sock is not None:
                sock.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if et is not None and self.proc.poll() is None:
            self.proc.kill()
        self.close()
