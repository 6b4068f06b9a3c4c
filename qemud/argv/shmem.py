"""``<shmem>``: inter-VM shared memory, QEMU's ivshmem-plain (a file in /dev/shm shared with
other guests or host programs) or ivshmem-doorbell (memory and interrupts from an
ivshmem-server, over a unix socket)."""

from __future__ import annotations

from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.qemuopts import opts

DEFAULT_SIZE = 4 << 20  # libvirt's default
MIN_SIZE = 1 << 20


def _check(b: Builder, i: int) -> str | None:
    """libvirt's rules for a <shmem>; the model QEMU gets, or None (with an error)."""
    s = b.domain.devices.shmem[i]
    path = f"/domain/devices/shmem[{i + 1}]"
    model = s.model.type if s.model is not None else "ivshmem-plain"
    if model == "ivshmem":
        b.error(f"{path}/model/@type", "the old 'ivshmem' device was removed from QEMU (4.0); "
                "use ivshmem-plain, or ivshmem-doorbell with a <server>")
        return None
    if s.address is not None and s.address.type != "pci":
        b.error(f"{path}/address/@type", "only 'pci' addresses are supported for the shared memory device")
        return None
    if not s.name or "/" in s.name or s.name in (".", ".."):
        b.error(f"{path}/@name", f"'{s.name}' cannot name a shared memory file in /dev/shm")
        return None
    if s.size is not None:
        n = s.size.bytes
        if n < MIN_SIZE:
            b.error(f"{path}/size", "shmem size must be at least 1 MiB (1024 KiB)")
            return None
        if n & (n - 1):
            b.error(f"{path}/size", "shmem size must be a power of two")
            return None
    if s.msi is not None and s.server is None:
        b.error(f"{path}/msi", "msi option is only supported with a server")
        return None
    if model == "ivshmem-plain" and s.server is not None:
        b.error(f"{path}/server", "an ivshmem-plain device has no server: use model ivshmem-doorbell")
        return None
    if model == "ivshmem-doorbell" and s.server is None:
        b.error(f"{path}/model/@type", "an ivshmem-doorbell device needs a <server> (its ivshmem-server)")
        return None
    if model == "ivshmem-doorbell" and s.size is not None:
        b.error(f"{path}/size", "the size of an ivshmem-doorbell device is its server's")
        return None
    return model


def add_shmems(b: Builder) -> None:
    for i, s in enumerate(b.domain.devices.shmem):
        path = f"/domain/devices/shmem[{i + 1}]"
        model = _check(b, i)
        if model is None or not b.has_device(model, f"{path}/model/@type", f"shmem model '{model}'"):
            continue
        props: dict[str, Any] = {"driver": model, "id": b.alias(s.alias, f"shmem{i}", path)}
        if model == "ivshmem-plain":
            mid = f"shmmem-{props['id']}"
            b.obj({"qom-type": "memory-backend-file", "id": mid, "mem-path": f"/dev/shm/{s.name}",
                   "size": s.size.bytes if s.size is not None else DEFAULT_SIZE, "share": True})
            props["memdev"] = mid
        else:
            assert s.server is not None
            cid = f"charshmem{i}"
            # libvirt's default socket, where an ivshmem-server started for this name listens
            sock = s.server.path or f"/var/lib/libvirt/shmem-{s.name}-sock"
            b.add("-chardev", "socket," + opts(("id", cid), ("path", sock)))
            props["chardev"] = cid
            msi = s.msi
            if msi is not None and msi.vectors:
                props["vectors"] = msi.vectors
            props["ioeventfd"] = msi.ioeventfd if msi is not None and msi.ioeventfd is not None else True
        if s.role is not None:
            props["master"] = "on" if s.role == "master" else "off"  # OnOffAuto in QEMU
        props.update(b.pci_props(s.address, path, "shared memory device"))
        b.device(props)
