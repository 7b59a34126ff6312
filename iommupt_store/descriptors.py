"""The descriptor catalogue under its old name: see ``iommupt_store.abi.catalogue``."""

from __future__ import annotations

from .abi.catalogue import (
    DEVICE_COMPATIBLE,
    DOMAIN_COMPATIBLE,
    FLAG_DELETED,
    FLAG_INCOMING,
    FORMAT_NAMES,
    KNOWN_VERSIONS,
    LATEST,
    DeviceDescriptorV1,
    DeviceDescriptorV2,
    DomainDescriptorV1,
    DomainDescriptorV2,
    HexU64,
    describe_errors,
    descriptor_json_schema,
    dump_descriptor,
    parse_device_descriptor,
    parse_domain_descriptor,
)

__all__ = [
    "DEVICE_COMPATIBLE",
    "DOMAIN_COMPATIBLE",
    "FLAG_DELETED",
    "FLAG_INCOMING",
    "FORMAT_NAMES",
    "KNOWN_VERSIONS",
    "LATEST",
    "DeviceDescriptorV1",
    "DeviceDescriptorV2",
    "DomainDescriptorV1",
    "DomainDescriptorV2",
    "HexU64",
    "describe_errors",
    "descriptor_json_schema",
    "dump_descriptor",
    "parse_device_descriptor",
    "parse_domain_descriptor",
]
