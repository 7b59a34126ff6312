"""Serialized descriptors: what one boot hands to the next, validated on every read.

One frozen pydantic class per version; old versions stay readable forever.
Readers accept every known version (``parse_domain_descriptor``), writers emit
only the latest. 64-bit values are ``"0x..."`` strings in JSON.

``DomainDescriptorV1`` carries exactly what the kernel's ``struct
iommu_domain_ser`` carries (compatible ``iommu-liveupdate-v1``): the header's
ref_count and flags, the top table's physical address, the top level, the VA
size and the sign-extend bit; plus the format name, which the kernel knows
from the driver and we need to pick a walker.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)

from .errors import BadData

DOMAIN_COMPATIBLE = "iommu-liveupdate-v1"
FLAG_DELETED = 1 << 0
FLAG_INCOMING = 1 << 1
FORMAT_NAMES = ("amdv1", "x86_64", "vtdss", "riscv")


def _parse_hex(value: Any, info: ValidationInfo) -> Any:
    """Accept ``"0x..."`` strings (the JSON form); ints only when built in Python, not from stored JSON."""
    if info.context and info.context.get("stored") and not isinstance(value, str):
        raise ValueError("must be a hex string like '0x1000' in a stored descriptor")
    if isinstance(value, str):
        if not value.startswith("0x") or not 3 <= len(value) <= 18:
            raise ValueError("must be a hex string like '0x1000' (at most 16 digits)")
        try:
            return int(value, 16)
        except ValueError:
            raise ValueError("must be a hex string like '0x1000'") from None
    return value


HexU64 = Annotated[
    int,
    BeforeValidator(_parse_hex),
    Field(ge=0, lt=1 << 64),
    PlainSerializer(lambda v: f"{v:#x}", return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": "^0x[0-9a-f]{1,16}$"}),
]
U32 = Annotated[int, Field(ge=0, lt=1 << 32)]


class _Descriptor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class DomainDescriptorV1(_Descriptor):
    """``struct iommu_domain_ser`` of the IOMMU live-update series (v2/v3)."""

    version: Literal[1] = 1
    compatible: Literal["iommu-liveupdate-v1"] = "iommu-liveupdate-v1"
    format: Literal["amdv1", "x86_64", "vtdss", "riscv"]
    ref_count: U32 = 1
    #: IOMMU_SER_FLAG_DELETED (bit 0), IOMMU_SER_FLAG_INCOMING (bit 1)
    flags: Annotated[int, Field(ge=0, le=FLAG_DELETED | FLAG_INCOMING)] = 0
    top_table_phys: Annotated[HexU64, Field(multiple_of=4096)]
    top_level: Annotated[int, Field(ge=0, le=5)]
    vasz: Annotated[int, Field(ge=12, le=64)]
    sign_extend: bool


_ADAPTER: TypeAdapter[DomainDescriptorV1] = TypeAdapter(DomainDescriptorV1)
#: every domain descriptor version this build reads
KNOWN_VERSIONS = (1,)
LATEST = DomainDescriptorV1


def describe_errors(err: ValidationError, what: str) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid {what}: " + "; ".join(parts)


def parse_domain_descriptor(data: Any, what: str = "domain descriptor") -> DomainDescriptorV1:
    """Validate a stored descriptor (a JSON string or the decoded object)."""
    try:
        if isinstance(data, str | bytes):
            return _ADAPTER.validate_json(data, context={"stored": True})
        return _ADAPTER.validate_python(data, context={"stored": True})
    except ValidationError as e:
        raise BadData(describe_errors(e, what)) from None


def dump_descriptor(desc: BaseModel) -> dict[str, Any]:
    """The JSON-ready form stored in the database."""
    return desc.model_dump(mode="json")


def descriptor_json_schema() -> dict[str, Any]:
    return _ADAPTER.json_schema()


DEVICE_COMPATIBLE = "iommu-device-v1"


class DeviceDescriptorV1(_Descriptor):
    """A preserved device attachment (``struct iommu_device_ser``): the PCI
    address, the domain id it uses, and the token of its preserved domain."""

    version: Literal[1] = 1
    compatible: Literal["iommu-device-v1"] = "iommu-device-v1"
    segment: Annotated[int, Field(ge=0, le=0xFFFF)]
    bus: Annotated[int, Field(ge=0, le=0xFF)]
    devfn: Annotated[int, Field(ge=0, le=0xFF)]
    did: Annotated[int, Field(ge=1, le=0xFFFF)]
    domain_token: HexU64
    owner: Annotated[str, Field(max_length=64)]

    @property
    def bdf(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7}"


_DEVICE_ADAPTER: TypeAdapter[DeviceDescriptorV1] = TypeAdapter(DeviceDescriptorV1)


def parse_device_descriptor(data: Any, what: str = "device descriptor") -> DeviceDescriptorV1:
    try:
        if isinstance(data, str | bytes):
            return _DEVICE_ADAPTER.validate_json(data, context={"stored": True})
        return _DEVICE_ADAPTER.validate_python(data, context={"stored": True})
    except ValidationError as e:
        raise BadData(describe_errors(e, what)) from None
