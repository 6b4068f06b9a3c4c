"""PCI addresses: explicit ``<address type='pci'>`` honoured, the rest assigned free slots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qemud.domain.devices.address import Address

#: Buses whose controllers take one device only (slot 0): PCIe ports.
ONE_SLOT = {"pcie-root-port", "pcie-switch-downstream-port"}
#: Controllers that provide a bus with 32 slots.
MANY_SLOTS = {"pci-root", "pcie-root", "pci-bridge", "dmi-to-pci-bridge", "pcie-to-pci-bridge",
              "pci-expander-bus", "pcie-expander-bus", "pcie-switch-upstream-port"}


@dataclass
class Bus:
    id: str
    model: str
    pcie: bool
    hotplug: bool = True

    @property
    def slots(self) -> range:
        if self.model in ONE_SLOT:
            return range(0, 1)
        if self.model in ("pci-root", "pcie-root", "pci-expander-bus", "pcie-expander-bus"):
            return range(1, 32)
        if self.model == "pcie-switch-upstream-port":
            return range(0, 32)
        return range(1, 32)  # bridges: slot 0 is reserved by libvirt's convention


@dataclass
class PciSpace:
    q35: bool
    buses: dict[int, Bus] = field(default_factory=dict)
    used: dict[tuple[int, int, int], str] = field(default_factory=dict)
    #: (bus, slot) that hold more than function 0: function 0 gets multifunction=on
    multi: set[tuple[int, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        root = "pcie-root" if self.q35 else "pci-root"
        self.buses[0] = Bus("pcie.0" if self.q35 else "pci.0", root, self.q35)
        self.used[(0, 0, 0)] = "the host bridge"
        if self.q35:
            for f in range(8):
                self.used[(0, 0x1F, f)] = "the ICH9 LPC, SATA and SMBus controllers"
        else:
            # PIIX3: ISA bridge at 1.0, IDE at 1.1 (claimed by the IDE controller's own address),
            # 1.2 for the first UHCI USB controller, ACPI/PM at 1.3
            self.used[(0, 1, 0)] = "the PIIX3 ISA bridge"
            self.used[(0, 1, 3)] = "the PIIX4 ACPI function"
            for f in range(4, 8):
                self.used[(0, 1, f)] = "the PIIX3"

    def add_bus(self, index: int, model: str) -> Bus:
        bus = Bus(f"pci.{index}", model, model.startswith("pcie") or model == "dmi-to-pci-bridge")
        self.buses[index] = bus
        return bus

    def bus_id(self, index: int) -> str | None:
        bus = self.buses.get(index)
        return bus.id if bus else None

    def reserve(self, addr: Address) -> str | None:
        """Claim an explicit address; returns an error message if it cannot be had."""
        key = (addr.bus or 0, addr.slot or 0, addr.function or 0)
        if addr.domain not in (None, 0):
            return f"PCI domain {addr.domain} does not exist (only domain 0)"
        if key[1] > 31 or key[2] > 7:
            return f"PCI address {key[0]:02x}:{key[1]:02x}.{key[2]} is out of range (slot 0-31, function 0-7)"
        holder = self.used.get(key)
        if holder is not None:
            return f"PCI address {key[0]:02x}:{key[1]:02x}.{key[2]} is already used by {holder}"
        self.used[key] = "another device"
        if key[2] > 0:
            self.multi.add((key[0], key[1]))
        return None

    def props(self, addr: Address) -> dict[str, Any] | str:
        """``bus``/``addr`` properties for an address reserved before (or a message)."""
        bus = self.buses.get(addr.bus or 0)
        if bus is None:
            return f"there is no PCI controller with index {addr.bus} for this address"
        slot, fn = addr.slot or 0, addr.function or 0
        out: dict[str, Any] = {"bus": bus.id, "addr": f"0x{slot:x}" if fn == 0 else f"0x{slot:x}.0x{fn:x}"}
        if addr.multifunction or (fn == 0 and ((addr.bus or 0), slot) in self.multi):
            out["multifunction"] = True
        return out

    def auto(self, what: str, pcie_ok: bool = True) -> dict[str, Any] | str:
        """The next free slot, preferring the root bus."""
        order = sorted(self.buses.items(), key=lambda kv: (kv[0] != 0, kv[0]))
        for index, bus in order:
            for slot in bus.slots:
                if all((index, slot, f) not in self.used for f in range(8)):
                    self.used[(index, slot, 0)] = what
                    return {"bus": bus.id, "addr": f"0x{slot:x}"}
        return "no free PCI slot is left (add a pci-bridge or pcie-root-port controller)"
