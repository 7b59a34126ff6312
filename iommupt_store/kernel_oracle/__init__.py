"""A real Linux kernel as the oracle for the tables the engine builds.

Debian's 7.3.4 kernel boots under QEMU (TCG) with an emulated Intel or AMD IOMMU, runs a scenario of
VFIO type1 map and unmap calls from a small static C program, and its page table is dumped from guest
memory through the IOMMU's own registers. The same calls are replayed into our engine, one
``map_range`` per physically contiguous run as VFIO makes them, and every word of every table is
compared. Run it with ``python -m iommupt_store.kernel_oracle``.
"""
