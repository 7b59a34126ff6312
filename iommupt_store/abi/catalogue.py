"""The descriptor catalogue: every version of what one boot hands to the next, validated on every read.

One frozen pydantic class per (kind, version); old versions stay readable
forever. The *catalogue version* (1, 2, ... stored in ``handover_entry.abi_version``)
is ours and numbers the layouts we know; it is not the kernel's own ``version``
field, which version 2 carries inside the descriptor (the newest series writes
compatible ``"iommu-liveupdate"`` plus an integer version, today 1).

- Version 1: the seed's series v3 (compatible ``iommu-liveupdate-v1`` /
  ``iommu-device-v1``), header ``{ref_count, flags}`` with deleted/incoming bits.
- Version 2: the newest series (compatible ``iommu-liveupdate``, kernel version
  1), header ``{ref_count, flags}`` (DELETED bit 0, INCOMING bit 1), device
  records with ``dma_owner_token``.

Fields the kernel's structs do not have are our additions; each version lists
them in ``OUR_FIELDS`` and the JSON Schema says so. Which version a process
writes and which it reads is its kernel profile's (``profiles.py``); users add
versions and converters with ``register_descriptor`` / ``register_converter``.
64-bit values are ``"0x..."`` strings in JSON.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

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

from ..errors import AlreadyExists, BadData, InvalidArgument

DOMAIN_COMPATIBLE = "iommu-liveupdate-v1"
DEVICE_COMPATIBLE = "iommu-device-v1"
#: the newest series: one compatible for the IOMMU FLB and its records, plus an integer version
SERIES_COMPATIBLE = "iommu-liveupdate"
SERIES_VERSION = 1
KINDS = ("domain", "device")
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


FormatName = Literal["amdv1", "x86_64", "vtdss", "riscv"]
Sha256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]


def _ours(text: str, **default: Any) -> Any:
    return Field(description=f"iommupt-store addition, not in the kernel's struct: {text}", **default)


class _Descriptor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    #: fields the kernel's struct does not carry (documented per version)
    OUR_FIELDS: ClassVar[tuple[str, ...]] = ()


class DomainDescriptorV1(_Descriptor):
    """``struct iommu_domain_ser`` of the IOMMU live-update series v2/v3 (catalogue version 1)."""

    OUR_FIELDS: ClassVar[tuple[str, ...]] = ("version", "format")

    version: Literal[1] = Field(1, description="iommupt-store addition: the catalogue version (1)")
    compatible: Literal["iommu-liveupdate-v1"] = "iommu-liveupdate-v1"
    format: FormatName = _ours("the page-table format, which the kernel knows from its driver")
    ref_count: U32 = 1
    #: IOMMU_SER_FLAG_DELETED (bit 0), IOMMU_SER_FLAG_INCOMING (bit 1)
    flags: Annotated[int, Field(ge=0, le=FLAG_DELETED | FLAG_INCOMING)] = 0
    top_table_phys: Annotated[HexU64, Field(multiple_of=4096)]
    top_level: Annotated[int, Field(ge=0, le=5)]
    vasz: Annotated[int, Field(ge=12, le=64)]
    sign_extend: bool


class DomainDescriptorV2(_Descriptor):
    """The newest series' domain record (catalogue version 2): compatible ``iommu-liveupdate`` with the
    kernel's integer ``version`` 1, the object header ``{ref_count, flags}``, the same domain fields."""

    OUR_FIELDS: ClassVar[tuple[str, ...]] = ("format", "oasz_lg2", "features", "frames_digest")

    compatible: Literal["iommu-liveupdate"] = "iommu-liveupdate"
    version: Literal[1] = Field(1, description="the kernel's own ABI version (not our catalogue's)")
    ref_count: U32 = 1
    flags: Annotated[int, Field(ge=0, le=FLAG_DELETED | FLAG_INCOMING)] = 0
    top_table_phys: Annotated[HexU64, Field(multiple_of=4096)]
    top_level: Annotated[int, Field(ge=0, le=5)]
    vasz: Annotated[int, Field(ge=12, le=64)]
    sign_extend: bool
    format: FormatName = _ours("the page-table format, which the kernel knows from its driver")
    oasz_lg2: Annotated[int, Field(ge=12, le=64)] | None = _ours("the output address width, if recorded", default=None)
    features: list[Annotated[str, Field(max_length=32)]] | None = _ours(
        "the domain's features by name (the kernel renumbers their bits), if recorded", default=None
    )
    frames_digest: Sha256 | None = _ours("SHA-256 over the preserved frames, if recorded", default=None)


class DeviceDescriptorV1(_Descriptor):
    """A preserved device attachment (``struct iommu_device_ser``, series v3): the PCI
    address, the domain id it uses, and the token of its preserved domain."""

    OUR_FIELDS: ClassVar[tuple[str, ...]] = ("version", "owner")

    version: Literal[1] = Field(1, description="iommupt-store addition: the catalogue version (1)")
    compatible: Literal["iommu-device-v1"] = "iommu-device-v1"
    segment: Annotated[int, Field(ge=0, le=0xFFFF)]
    bus: Annotated[int, Field(ge=0, le=0xFF)]
    devfn: Annotated[int, Field(ge=0, le=0xFF)]
    did: Annotated[int, Field(ge=1, le=0xFFFF)]
    domain_token: HexU64
    owner: Annotated[str, Field(max_length=64)] = _ours("the DMA owner's name")

    @property
    def bdf(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7}"


class DeviceDescriptorV2(_Descriptor):
    """The newest series' device record (catalogue version 2): the object header, the attachment,
    and the ``dma_owner_token`` of the DMA owner (iommufd/VFIO) that may claim it again."""

    OUR_FIELDS: ClassVar[tuple[str, ...]] = ("owner",)

    compatible: Literal["iommu-liveupdate"] = "iommu-liveupdate"
    version: Literal[1] = Field(1, description="the kernel's own ABI version (not our catalogue's)")
    ref_count: U32 = 1
    flags: Annotated[int, Field(ge=0, le=FLAG_DELETED | FLAG_INCOMING)] = 0
    segment: Annotated[int, Field(ge=0, le=0xFFFF)]
    bus: Annotated[int, Field(ge=0, le=0xFF)]
    devfn: Annotated[int, Field(ge=0, le=0xFF)]
    did: Annotated[int, Field(ge=1, le=0xFFFF)]
    domain_token: HexU64
    dma_owner_token: HexU64 = 0
    owner: Annotated[str, Field(max_length=64)] = _ours("the DMA owner's name")

    @property
    def bdf(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7}"


def dma_owner_token(owner: str | None) -> int:
    """A stable u64 standing for a DMA owner (0: none), as the kernel's ``dma_owner_token``."""
    if not owner:
        return 0
    return int.from_bytes(hashlib.sha256(owner.encode()).digest()[:8], "little") or 1


# -- the registry ----------------------------------------------------------------------------------
#: what restore and the seal use of a descriptor of each kind, whatever its version
REQUIRED_FIELDS = {
    "domain": ("compatible", "flags", "format", "top_table_phys", "top_level", "vasz", "sign_extend"),
    "device": ("compatible", "segment", "bus", "devfn", "did", "domain_token", "owner"),
}
_MODELS: dict[tuple[str, int], type[BaseModel]] = {}
_ADAPTERS: dict[tuple[str, int], TypeAdapter[Any]] = {}
Converter = Callable[[dict[str, Any]], dict[str, Any]]
_CONVERTERS: dict[tuple[str, int, int], Converter] = {}


def _check_kind(kind: object) -> str:
    if kind not in KINDS:
        raise InvalidArgument(f"descriptor kind {kind!r} is not one of {', '.join(KINDS)}")
    return str(kind)


def _check_version(version: object, what: str = "version") -> int:
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= 1000:
        raise InvalidArgument(f"descriptor {what} {version!r} must be an integer from 1 to 1000")
    return version


def register_descriptor(kind: str, version: int, model: type[BaseModel]) -> None:
    """Add (kind, version) to the catalogue. The model must be a frozen pydantic class whose
    ``compatible`` field has a default, with every field restore uses (``REQUIRED_FIELDS``)."""
    kind = _check_kind(kind)
    version = _check_version(version)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise InvalidArgument(f"{kind} descriptor version {version}: {model!r} is not a pydantic model class")
    name = model.__qualname__
    missing = [f for f in REQUIRED_FIELDS[kind] if f not in model.model_fields]
    if missing:
        raise InvalidArgument(f"{kind} descriptor version {version} ({name}) lacks field(s) {', '.join(missing)}")
    compatible = model.model_fields["compatible"].default
    if not isinstance(compatible, str) or not compatible:
        raise InvalidArgument(f"{kind} descriptor version {version} ({name}): 'compatible' needs a string default")
    if not model.model_config.get("frozen"):
        raise InvalidArgument(f"{kind} descriptor version {version} ({name}) must be frozen (model_config frozen=True)")
    old = _MODELS.get((kind, version))
    if old is not None and old is not model:
        raise AlreadyExists(f"{kind} descriptor version {version} is already registered ({old.__qualname__})")
    _MODELS[(kind, version)] = model
    _ADAPTERS[(kind, version)] = TypeAdapter(model)


def register_converter(kind: str, from_version: int, to_version: int, fn: Converter) -> None:
    """A scripted migration of the serialization format, run at restore: JSON dict in, JSON dict out;
    the result is validated by the target version's model."""
    kind = _check_kind(kind)
    src = _check_version(from_version, "from_version")
    dst = _check_version(to_version, "to_version")
    if src == dst:
        raise InvalidArgument(f"{kind} converter {src}->{dst} converts a version to itself")
    if not callable(fn):
        raise InvalidArgument(f"{kind} converter {src}->{dst}: {fn!r} is not callable")
    old = _CONVERTERS.get((kind, src, dst))
    if old is not None and old is not fn:
        raise AlreadyExists(f"a {kind} converter {src}->{dst} is already registered")
    _CONVERTERS[(kind, src, dst)] = fn


def versions(kind: str) -> list[int]:
    """Every version of ``kind`` this process reads (built in and registered)."""
    return sorted(v for k, v in _MODELS if k == kind)


def model_of(kind: str, version: int) -> type[BaseModel]:
    model = _MODELS.get((kind, version))
    if model is None:
        known = ", ".join(str(v) for v in versions(kind)) or "none"
        raise BadData(f"{kind} descriptor version {version} is not in the catalogue (known: {known})")
    return model


def compatible_of(kind: str, version: int) -> str:
    """The compatible string a (kind, version) descriptor is written with."""
    return str(model_of(kind, version).model_fields["compatible"].default)


def conversion_path(kind: str, src: int, targets: set[int]) -> list[int] | None:
    """The shortest chain of registered converters from ``src`` to one of ``targets`` (versions in order)."""
    frontier = [[src]]
    seen = {src}
    while frontier:
        nxt = []
        for path in frontier:
            if path[-1] in targets and len(path) > 1:
                return path
            for k, a, b in sorted(_CONVERTERS):
                if k == kind and a == path[-1] and b not in seen:
                    seen.add(b)
                    nxt.append([*path, b])
        frontier = nxt
    return None


def describe_errors(err: ValidationError, what: str) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid {what}: " + "; ".join(parts)


def parse_descriptor(kind: str, version: int, data: Any, what: str | None = None) -> Any:
    """Validate a stored descriptor of (kind, version): a JSON string or the decoded object."""
    what = what or f"{kind} descriptor"
    model_of(kind, version)
    adapter = _ADAPTERS[(kind, version)]
    try:
        if isinstance(data, str | bytes):
            return adapter.validate_json(data, context={"stored": True})
        return adapter.validate_python(data, context={"stored": True})
    except ValidationError as e:
        raise BadData(describe_errors(e, what)) from None


def convert(kind: str, path: list[int], data: Any, what: str) -> Any:
    """Run the converters along ``path`` over a stored descriptor; validate the result with the last model."""
    if not isinstance(data, dict):
        raise BadData(f"{what}: the stored descriptor is not a JSON object")
    parse_descriptor(kind, path[0], data, what)
    out: Any = dict(data)
    for a, b in itertools.pairwise(path):
        try:
            out = _CONVERTERS[(kind, a, b)](dict(out))
        except Exception as e:  # a user's converter is code we do not control: its failure is bad data
            raise BadData(f"{what}: the {kind} converter {a}->{b} failed: {type(e).__name__}: {e}") from None
        if not isinstance(out, dict):
            raise BadData(f"{what}: the {kind} converter {a}->{b} returned {type(out).__name__}, not a JSON object")
    return parse_descriptor(kind, path[-1], out, f"{what} (converted from version {path[0]} to {path[-1]})")


def read_along(kind: str, path: list[int], data: Any, what: str) -> Any:
    """A stored descriptor of version ``path[0]`` read as version ``path[-1]`` (converted when they differ)."""
    if len(path) == 1:
        return parse_descriptor(kind, path[0], data, what)
    return convert(kind, path, data, what)


def written_as(kind: str, version: int, v2: BaseModel) -> Any:
    """What a writer of ``version`` stores for the version-2 descriptor ``v2`` (a user's version through
    the registered converters from 2)."""
    if version == 2:
        return v2
    path = conversion_path(kind, 2, {version})
    if path is None:
        raise InvalidArgument(
            f"the kernel profile writes {kind} descriptor version {version}: no converter leads there"
        )
    return convert(kind, path, dump_descriptor(v2), f"the new {kind} descriptor")


def version_of(kind: str, data: Any) -> int:
    """The catalogue version of a stored descriptor, from its compatible (built-in versions only)."""
    compatible = data.get("compatible") if isinstance(data, dict) else None
    if compatible == SERIES_COMPATIBLE:
        return 2
    return 1


def parse_domain_descriptor(data: Any, what: str = "domain descriptor", version: int | None = None) -> Any:
    return parse_descriptor("domain", version or version_of("domain", data), data, what)


def parse_device_descriptor(data: Any, what: str = "device descriptor", version: int | None = None) -> Any:
    return parse_descriptor("device", version or version_of("device", data), data, what)


def dump_descriptor(desc: BaseModel) -> dict[str, Any]:
    """The JSON-ready form stored in the database."""
    return desc.model_dump(mode="json")


def json_schema(kind: str, version: int) -> dict[str, Any]:
    model_of(kind, version)
    schema = _ADAPTERS[(kind, version)].json_schema()
    schema["$comment"] = f"iommupt-store {kind} descriptor, catalogue version {version}"
    return schema


def descriptor_json_schema() -> dict[str, Any]:
    return json_schema("domain", 1)


# -- the built-in versions and their converters ---------------------------------------------------------
def _domain_1_to_2(d: dict[str, Any]) -> dict[str, Any]:
    out = {k: d[k] for k in ("ref_count", "flags", "top_table_phys", "top_level", "vasz", "sign_extend", "format")}
    return {"compatible": SERIES_COMPATIBLE, "version": SERIES_VERSION, **out}


def _device_1_to_2(d: dict[str, Any]) -> dict[str, Any]:
    out = {k: d[k] for k in ("segment", "bus", "devfn", "did", "domain_token", "owner")}
    # a series-v3 device record carries no DMA owner token
    return {"compatible": SERIES_COMPATIBLE, "version": SERIES_VERSION, **out, "dma_owner_token": "0x0"}


register_descriptor("domain", 1, DomainDescriptorV1)
register_descriptor("domain", 2, DomainDescriptorV2)
register_descriptor("device", 1, DeviceDescriptorV1)
register_descriptor("device", 2, DeviceDescriptorV2)
register_converter("domain", 1, 2, _domain_1_to_2)
register_converter("device", 1, 2, _device_1_to_2)

#: the built-in domain descriptor versions
KNOWN_VERSIONS = (1, 2)
LATEST = DomainDescriptorV2
