"""``<interface>``: network interfaces."""

import re
from typing import Literal

from pydantic import field_validator

from qemud.domain.base import Element, Many, Opaque, UInt, YesNo, attr, child, ignored
from qemud.domain.devices.disk import AcpiIndex
from qemud.domain.devices.address import Address, Alias, Boot
from qemud.domain.devices.chardev import Reconnect
from qemud.domain.devices.hostdev import SourceAddress, Teaming
from qemud.domain.devices.virtio import VirtioOptions

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")


class Mac(Element):
    address: str = attr(...)

    @field_validator("address")
    @classmethod
    def _mac(cls, v: str) -> str:
        if not _MAC.match(v):
            raise ValueError(f"'{v}' is not a MAC address like 52:54:00:12:34:56")
        if int(v[:2], 16) & 1:
            raise ValueError(f"'{v}' is a multicast MAC address; a NIC needs a unicast one")
        return v.lower()


class IfaceSource(Element):
    bridge: str | None = attr()
    network: str | None = attr()
    portgroup: str | None = attr()
    dev: str | None = attr()
    mode: str | None = attr()
    address: str | None = attr()
    port: UInt | None = attr()
    path: str | None = attr()
    type: str | None = attr()
    portid: str | None = attr()
    reconnect: Reconnect | None = None
    #: type='hostdev': the VF's host PCI address (qemud.argv.hostdev)
    pci_address: SourceAddress | None = child("address")


class IfaceModel(Element):
    type: str = attr(...)

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError(f"'{v}' is not a NIC model name")
        return v


class IfaceTarget(Element):
    dev: str = attr(...)
    managed: YesNo | None = attr()


class IfaceDriver(VirtioOptions):
    name: Literal["qemu", "vhost", "vfio"] | None = attr()
    queues: UInt | None = attr()
    txmode: Literal["iothread", "timer"] | None = attr()
    ioeventfd: YesNo | None = attr()
    event_idx: YesNo | None = attr()
    rx_queue_size: UInt | None = attr()
    tx_queue_size: UInt | None = attr()
    rss: YesNo | None = attr()
    rss_hash_report: YesNo | None = attr()
    host: Opaque | None = ignored("virtio offload tuning is not applied yet")
    guest: Opaque | None = ignored("virtio offload tuning is not applied yet")


class Link(Element):
    state: Literal["up", "down"] = attr(...)


class Mtu(Element):
    size: UInt = attr(...)


class Rom(Element):
    bar: YesNo | None = attr()
    file: str | None = attr()
    enabled: YesNo | None = attr()


class CoalesceFrames(Element):
    max: UInt = attr(...)


class CoalesceRx(Element):
    frames: CoalesceFrames | None = None


class Coalesce(Element):
    """Interrupt coalescing of the host's tap (ethtool rx-frames): host-side, set by libvirt."""

    rx: CoalesceRx | None = None


class Port(Element):
    """<port isolated>: the bridge port's isolation, a host-side setting."""

    isolated: YesNo | None = attr()


class PortRange(Element):
    start: UInt = attr(...)
    end: UInt | None = attr()
    to: UInt | None = attr()
    exclude: YesNo | None = attr()


class PortForward(Element):
    """passt's port forwarding from the host to the guest (user-mode NICs with backend passt)."""

    proto: Literal["tcp", "udp"] = attr(...)
    address: str | None = attr()
    dev: str | None = attr()
    range: Many[PortRange]


class Backend(Element):
    type: Literal["default", "passt"] | None = attr()
    logFile: str | None = attr()
    tap: str | None = attr()
    vhost: str | None = attr()


class Script(Element):
    path: str = attr(...)


class Interface(Element):
    type: Literal["user", "network", "bridge", "ethernet", "direct", "vhostuser", "server",
                  "client", "mcast", "udp", "hostdev", "vdpa", "null", "vds"] = attr(...)
    trustGuestRxFilters: YesNo | None = attr()
    managed: YesNo | None = attr()  # type='hostdev' (qemud.argv.hostdev)
    mac: Mac | None = None
    source: IfaceSource | None = None
    model: IfaceModel | None = None
    target: IfaceTarget | None = None
    driver: IfaceDriver | None = None
    boot: Boot | None = None
    link: Link | None = None
    mtu: Mtu | None = None
    rom: Rom | None = None
    script: Script | None = None
    coalesce: Coalesce | None = None
    port: Port | None = None
    backend: Backend | None = None
    portForward: Many[PortForward]
    acpi: AcpiIndex | None = None
    address: Address | None = None
    alias: Alias | None = None
    teaming: Teaming | None = None  # failover pairs (qemud.argv.hostdev)
    vlan: Opaque | None = ignored("VLAN tags are set up on the host side, which qemud does not configure")
    filterref: Opaque | None = ignored("libvirt's nwfilter is not part of qemud")
    bandwidth: Opaque | None = ignored("host-side traffic shaping is not applied by qemud")
    virtualport: Opaque | None = ignored("Open vSwitch port profiles are not applied by qemud")
    guest: Opaque | None = ignored("a guest-side interface name only applies to containers")
    #: the guest's address: passt hands it out (--address); otherwise containers only (net.py warns)
    ip: Many[Opaque]
    route: Many[Opaque] = ignored("guest-side routes only apply to containers")
