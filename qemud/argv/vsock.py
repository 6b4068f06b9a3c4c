"""``<vsock>``: vhost-vsock-pci, the guest's AF_VSOCK endpoint.

libvirt opens /dev/vhost-vsock itself and passes the fd (vhostfd); QEMU opens it by itself when
no fd is given, which is what qemud lets it do.  libvirt's <cid auto='yes'> probes the kernel for
a free context id; a pure translator cannot, so qemud derives a stable one from the domain's UUID
(QEMU refuses to start if another guest holds it: give <cid address> then)."""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.virtio import add_virtio_props

PATH = "/domain/devices/vsock"
VHOST_VSOCK = "/dev/vhost-vsock"
_DRIVERS = {None: "vhost-vsock-pci", "virtio": "vhost-vsock-pci",
            "virtio-transitional": "vhost-vsock-pci-transitional",
            "virtio-non-transitional": "vhost-vsock-pci-non-transitional"}
#: context ids 0-2 are the hypervisor's, the reserved one and the host's; 2^32-1 is "any"
MIN_CID, MAX_CID = 3, 0xFFFFFFFE


def auto_cid(uuid: str) -> int:
    """A context id for <cid auto='yes'>: stable across starts of the same guest."""
    return MIN_CID + uuidlib.UUID(uuid).int % (0x7FFFFFFF - MIN_CID)


def add_vsock(b: Builder) -> None:
    vs = b.domain.devices.vsock
    if vs is None:
        return
    driver = _DRIVERS[vs.model]
    if not b.has_device(driver, f"{PATH}/@model", f"vsock model '{vs.model}'"):
        return
    cid = vs.cid
    if cid is not None and cid.address is not None and cid.auto is not True:
        if not MIN_CID <= cid.address <= MAX_CID:
            b.error(f"{PATH}/cid/@address", f"guest CID {cid.address} is reserved: use {MIN_CID} or more")
            return
        guest_cid = cid.address
    elif cid is not None and cid.auto is False:
        b.error(f"{PATH}/cid", "<cid auto='no'> needs an address")
        return
    else:
        guest_cid = auto_cid(b.domain.uuid_value)
    props: dict[str, Any] = {"driver": driver, "id": b.alias(vs.alias, "vsock0", PATH), "guest-cid": guest_cid}
    props.update(b.pci_props(vs.address, PATH, "vsock device"))
    b.device(add_virtio_props(b, props, vs.driver, PATH))  # with QEMU's iommu_platform rule
    if not b.caps.host.has(VHOST_VSOCK):
        b.error(PATH, f"needs {VHOST_VSOCK}, which this host lacks (load the vhost_vsock kernel module)")
