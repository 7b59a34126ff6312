"""The guest's initramfs: busybox, our static guest program, the VFIO modules and the plan.

Written as a newc cpio archive from Python (no cpio tool needed on the host).
"""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterable
from pathlib import Path

#: The guest's PID 1: load VFIO, hand the device to vfio-pci, run the plan, power off.
INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in irqbypass vfio vfio_iommu_type1 vfio-pci-core vfio-pci; do
    if [ "$m" = vfio_iommu_type1 ]; then
        /bin/busybox insmod /lib/modules/$m.ko allow_unsafe_interrupts=1 || echo "oracle: insmod $m failed"
    else
        /bin/busybox insmod /lib/modules/$m.ko || echo "oracle: insmod $m failed"
    fi
done
echo {hugepages} > /proc/sys/vm/nr_hugepages
DEV=/sys/bus/pci/devices/{bdf}
echo vfio-pci > $DEV/driver_override
[ -e $DEV/driver ] && echo {bdf} > $DEV/driver/unbind
echo {bdf} > /sys/bus/pci/drivers_probe
GROUP=$(/bin/busybox basename $(/bin/busybox readlink $DEV/iommu_group))
echo "oracle: group $GROUP, hugepages $(cat /proc/sys/vm/nr_hugepages)"
/bin/oracle_guest /plan.txt /dev/ttyS1 /dev/vfio/$GROUP
echo "oracle: guest exit $?"
/bin/busybox poweroff -f
"""


def _newc_entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    blob = header + name.encode() + b"\0"
    blob += b"\0" * (-len(blob) % 4)
    blob += data + b"\0" * (-len(data) % 4)
    return blob


def newc_archive(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, contents) entries; directories have empty contents."""
    out = [_newc_entry(name, mode, data, i + 1) for i, (name, mode, data) in enumerate(entries)]
    out.append(_newc_entry("TRAILER!!!", 0, b"", 0))
    return b"".join(out)


def build_initramfs(
    dest: Path, *, busybox: Path, guest: Path, modules: dict[str, Path], plan: str, bdf: str, hugepages: int
) -> None:
    """Write the gzip'd initramfs for one guest boot to ``dest``."""
    directory, executable, regular = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644
    entries: list[tuple[str, int, bytes]] = [
        ("bin", directory, b""),
        ("lib", directory, b""),
        ("lib/modules", directory, b""),
        ("bin/busybox", executable, busybox.read_bytes()),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        ("bin/oracle_guest", executable, guest.read_bytes()),
        ("init", executable, INIT_SCRIPT.format(bdf=bdf, hugepages=hugepages).encode()),
        ("plan.txt", regular, plan.encode()),
    ]
    entries += [(f"lib/modules/{name}.ko", regular, path.read_bytes()) for name, path in modules.items()]
    dest.write_bytes(gzip.compress(newc_archive(entries), compresslevel=1))
