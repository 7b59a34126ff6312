"""The kernel's KUnit configurations (generic_pt spec §5.2), one entry each.

``features`` is what the KUnit fixture requests after OR-ing in the supported
set (the "effective features" column), limited to the production feature set
the store accepts: the debug-only FLUSH_RANGE_NO_GAPS of vtdss and riscv only
changes IOTLB flushing, never table contents. FULL_VA is set by init itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iommupt_store.formats.base import Feature as F

_FLUSH = frozenset({F.FLUSH_RANGE, F.FLUSH_RANGE_NO_GAPS})
_FLUSH_PROD = frozenset({F.FLUSH_RANGE})


@dataclass(frozen=True)
class KunitConfig:
    id: str
    format: str
    hw_max_vasz_lg2: int
    hw_max_oasz_lg2: int
    top_level: int | None
    features: frozenset[F] = field(default_factory=frozenset)


KUNIT_CONFIGS: tuple[KunitConfig, ...] = (
    KunitConfig(
        "amdv1_cfg_0",
        "amdv1",
        64,
        52,
        2,
        _FLUSH | {F.DYNAMIC_TOP, F.AMDV1_ENCRYPT_TABLES, F.AMDV1_FORCE_COHERENCE},
    ),
    KunitConfig("x86_64_cfg_0", "x86_64", 48, 52, 3, _FLUSH | {F.SIGN_EXTEND, F.X86_64_AMD_ENCRYPT_TABLES}),
    KunitConfig("x86_64_cfg_1", "x86_64", 57, 52, 4, _FLUSH | {F.SIGN_EXTEND, F.X86_64_AMD_ENCRYPT_TABLES}),
    KunitConfig("x86_64_cfg_2", "x86_64", 47, 52, 3, _FLUSH | {F.X86_64_AMD_ENCRYPT_TABLES}),
    KunitConfig("x86_64_cfg_3", "x86_64", 56, 52, 4, _FLUSH | {F.X86_64_AMD_ENCRYPT_TABLES}),
    KunitConfig("vtdss_cfg_0", "vtdss", 39, 52, 2, _FLUSH_PROD | {F.DMA_INCOHERENT, F.VTDSS_FORCE_COHERENCE}),
    KunitConfig("vtdss_cfg_1", "vtdss", 48, 52, 3, _FLUSH_PROD | {F.DMA_INCOHERENT, F.VTDSS_FORCE_COHERENCE}),
    KunitConfig("vtdss_cfg_2", "vtdss", 57, 52, 4, _FLUSH_PROD | {F.DMA_INCOHERENT, F.VTDSS_FORCE_COHERENCE}),
    KunitConfig(
        "riscv_cfg_0", "riscv", 39, 56, None, _FLUSH_PROD | {F.SIGN_EXTEND, F.RISCV_SVNAPOT_64K, F.RISCV_SVPBMT}
    ),
    KunitConfig("riscv_cfg_1", "riscv", 48, 56, None, _FLUSH_PROD | {F.SIGN_EXTEND, F.RISCV_SVPBMT}),
    KunitConfig(
        "riscv_cfg_2", "riscv", 57, 56, None, _FLUSH_PROD | {F.SIGN_EXTEND, F.RISCV_SVNAPOT_64K, F.RISCV_SVPBMT}
    ),
)

KUNIT_IDS = [c.id for c in KUNIT_CONFIGS]

#: the ``test_oa`` constant of the KUnit fixture, before masking to max OA
KUNIT_TEST_OA = 0x74A71445DEADBEEF
