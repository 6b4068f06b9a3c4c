"""``<smartcard>``: a card in a CCID reader (usb-ccid): emulated from the host's NSS database
(mode host / host-certificates, QEMU's ccid-card-emulated) or passed through a character device
to a remote client such as SPICE (mode passthrough, ccid-card-passthru)."""

from __future__ import annotations

from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.chardev import chardev
from qemud.argv.redirdev import usb_port
from qemud.domain.devices.chardev import CHAR_TYPES, CharDev

#: libvirt's NSS database when <database> is absent
DEFAULT_DB = "/etc/pki/nssdb"


def add_smartcards(b: Builder) -> None:
    dev = b.domain.devices
    ccids = {c.index for c in dev.controller if c.type == "ccid"}  # usb-ccid "ccidN" made by controllers.py
    for i, sc in enumerate(dev.smartcard):
        path = f"/domain/devices/smartcard[{i + 1}]"
        if i > 0:
            b.error(path, "only one smartcard is supported (libvirt's limit: one CCID reader, one card)")
            continue
        addr = sc.address
        if addr is not None and addr.type != "ccid":
            b.error(f"{path}/address/@type", f"a smartcard sits in a CCID reader: address type 'ccid', not '{addr.type}'")
            continue
        ctrl = (addr.controller or 0) if addr is not None else 0
        if addr is not None and addr.slot not in (None, 0):
            b.error(f"{path}/address/@slot", "a CCID reader has one slot (0)")
            continue
        if ctrl not in ccids:
            if ctrl != 0 or ccids:
                b.error(f"{path}/address/@controller", f"there is no <controller type='ccid' index='{ctrl}'>")
                continue
            # libvirt adds the reader when the file has none
            if b.usb_bus is None:
                b.error(path, "a smartcard reader (usb-ccid) needs a USB controller")
                continue
            if not b.has_device("usb-ccid", path, "a smartcard reader"):
                continue
            b.ids.add("ccid0")
            b.device({"driver": "usb-ccid", "id": "ccid0", **usb_port(b, None, path)})
        bus = f"ccid{ctrl}.0"
        sid = b.alias(sc.alias, f"smartcard{i}", path)
        props: dict[str, Any]
        if sc.mode == "host":
            if sc.certificate or sc.database is not None or sc.source:
                b.error(path, "mode='host' takes no certificates, database or source")
                continue
            props = {"driver": "ccid-card-emulated", "backend": "nss-emulated"}
        elif sc.mode == "host-certificates":
            if len(sc.certificate) != 3:
                b.error(f"{path}/certificate", f"mode='host-certificates' needs exactly 3 certificates, not {len(sc.certificate)}")
                continue
            props = {"driver": "ccid-card-emulated", "backend": "certificates"}
            for n, cert in enumerate(sc.certificate):
                if not cert.value or "," in cert.value:
                    b.error(f"{path}/certificate[{n + 1}]", f"'{cert.value}' is not a certificate nickname (no commas)")
                props[f"cert{n + 1}"] = cert.value
            props["db"] = sc.database.value if sc.database is not None and sc.database.value else DEFAULT_DB
        else:
            ctype = sc.type or "pty"
            if ctype not in CHAR_TYPES:
                b.error(f"{path}/@type", f"'{ctype}' is not a character device type")
                continue
            cid = f"charsmartcard{i}"
            cd = CharDev.model_validate({"@type": ctype,
                                         "source": [s.model_dump(by_alias=True, exclude_none=True) for s in sc.source],
                                         **({"protocol": sc.protocol.model_dump(by_alias=True)} if sc.protocol else {})})
            if not chardev(b, cd, cid, path, spicevmc="smartcard"):
                continue
            props = {"driver": "ccid-card-passthru", "chardev": cid}
        if not b.has_device(props["driver"], f"{path}/@mode", f"smartcard mode '{sc.mode}'"):
            continue
        props.update(id=sid, bus=bus)
        b.device(props)
        if sc.mode == "host" or props.get("db") == DEFAULT_DB:
            # an NSS database elsewhere (<database>) is not known to HostFacts: QEMU says if it is missing
            if not b.caps.host.has(DEFAULT_DB):
                b.error(f"{path}/@mode", f"needs the NSS database {DEFAULT_DB}, which this host lacks "
                        "(NSS must see the host's card or certificates there)")
